"""The library is the front door: the CLI only parses strings into the objects ``compress`` takes, so
the same settings through Python and through the CLI give bit-identical files."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import compresskit  # noqa: E402
from compresskit import CalibrationConfig, CompressConfig  # noqa: E402
from compresskit.adapters import CausalLMAdapter  # noqa: E402
from compresskit.cli.main import main  # noqa: E402


def test_python_and_cli_give_bit_identical_files(saved, tmp_path):
    model_dir = str(saved("llama")[0])
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    try:
        main(["quantize", "--model", model_dir, "--method", "pq", "--bits", "2", "--calib-samples", "4",
              "--option", "seq_len=32", "--calib-set", "local_rounds=1", "--no-eval", "--out", str(cli_out)])
    except SystemExit as exit_:
        assert not exit_.code

    adapter = CausalLMAdapter()
    loaded = adapter.load(model_dir)
    calibration = CalibrationConfig.preset("fast", n_samples=4, options={"seq_len": 32}, local_rounds=1)
    report = compresskit.compress(loaded, CompressConfig(method="pq", bits=2), adapter=adapter, calibration=calibration)
    compresskit.save(loaded.model, report, py_out, source={"model": loaded.source, "adapter": adapter.name},
                     save_architecture=lambda d: adapter.save_architecture(loaded, d))

    assert (cli_out / "model.safetensors").read_bytes() == (py_out / "model.safetensors").read_bytes()
    cli_layers = json.loads((cli_out / "manifest.json").read_text())["layers"]
    py_layers = json.loads((py_out / "manifest.json").read_text())["layers"]
    assert cli_layers.keys() == py_layers.keys()
    for name in cli_layers:  # everything but timings
        assert cli_layers[name]["quantizer"] == py_layers[name]["quantizer"]
        assert cli_layers[name]["rel_error"] == py_layers[name]["rel_error"]
    # the adapter's method defaults were applied by the library, not by the CLI
    assert all(layer["quantizer"]["params"]["row_scale"] is True for layer in py_layers.values())
