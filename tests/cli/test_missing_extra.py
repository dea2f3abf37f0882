"""With only the base package installed, a family's missing dependency is one line naming the extra."""
import subprocess
import sys

import pytest

BLOCK = "import sys\nfor m in ('transformers', 'huggingface_hub', 'gguf', 'tokenizers'): sys.modules[m] = None\n"


@pytest.mark.parametrize("model", ["no/such-model", "smollm2-135m", None])
def test_quantize_without_the_lm_extra_is_one_line(model, tmp_path):
    argv = ["quantize", "--out", str(tmp_path / "x")] + ([] if model is None else ["--model", model])
    code = BLOCK + f"from compresskit.cli.main import main\nmain({argv!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'compresskit[lm]'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
