"""Streaming compression: the same result as compressing in memory, resumable after a real kill -9."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compresskit import CalibrationConfig, CompressConfig, compress, io
from compresskit.adapters.lm.adapter import CausalLMAdapter
from compresskit.calib.capture import Call
from compresskit.calib.offload import ActivationStore, Ref
from compresskit.calib.walk import ChainState
from compresskit.errors import CompressKitError
from compresskit.nn import quantized_tensors
from compresskit.stream import compress_streaming
from compresskit.stream.checkpoint import load_carry, partial_dir, save_carry

CALIB = CalibrationConfig(n_samples=4, batch_size=2, options={"seq_len": 32})
ZERO_DATA = CalibrationConfig.preset("zero-data", n_samples=4, batch_size=2, m_steps=3, options={"seq_len": 32})  # the block M-step, soft candidates
CLI_CALIB = ["--calib-samples", "4", "--calib-set", "batch_size=2", "--option", "seq_len=32", "--no-eval"]


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    manifest = io.read_manifest(directory)
    out: dict[str, torch.Tensor] = {}
    for name in manifest.get("tensor_files", [io.TENSORS]):
        out.update(load_file(str(directory / name)))
    return out


def assert_same_model(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    la, lb = io.read_manifest(a)["layers"], io.read_manifest(b)["layers"]
    assert {k: v["quantizer"] for k, v in la.items()} == {k: v["quantizer"] for k, v in lb.items()}


@pytest.mark.parametrize("method, calibration, tied", [("pq", CALIB, False), ("gptq", CALIB, True), ("rtn", None, False), ("pq", ZERO_DATA, False)])
def test_streamed_is_the_in_memory_result(llama_dir, tmp_path, method, calibration, tied):
    model_dir = llama_dir(tied)
    adapter = CausalLMAdapter()
    config = CompressConfig(method=method, bits=2)
    result = compress_streaming(str(model_dir), tmp_path / "streamed", config, adapter=adapter, calibration=calibration)
    loaded = adapter.load(str(model_dir))
    report = compress(loaded, config, adapter=adapter, calibration=calibration)
    io.save(loaded.model, report, tmp_path / "whole", source={"model": str(model_dir)})
    assert_same_model(tmp_path / "streamed", tmp_path / "whole")
    assert len(result.report.layers) == len(report.layers) == 28
    assert result.report.to_dict()["total"] == report.to_dict()["total"]  # sizes accounted the same way
    files = io.read_manifest(tmp_path / "streamed")["tensor_files"]
    assert files == [io.TENSORS] + [f"blocks/model.layers.{i}.safetensors" for i in range(4)]
    assert sorted(result.block_seconds) == [f"model.layers.{i}" for i in range(4)]
    # the streamed directory loads like any other and computes what the in-memory model computes
    again = io.load_compressed(tmp_path / "streamed")[0].model
    skeleton = adapter.load_architecture(tmp_path / "streamed" / io.ARCHITECTURE).model
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, io.load(tmp_path / "whole", model=skeleton)(input_ids=ids).logits)
    assert not partial_dir(tmp_path / "streamed").exists()


def test_the_carry_round_trips(tmp_path):
    store = ActivationStore()
    cos, mask = torch.randn(1, 8, 4), torch.ones(1, 1, 8, 8, dtype=torch.bool)
    calls = [Call((store.put(f"x{j}", torch.randn(1, 8, 4)),), {"position_embeddings": (cos, cos * 2), "attention_mask": mask, "use_cache": False, "n": 3, "p": None})
             for j in range(2)]
    fp_calls = [c.with_input(torch.randn(1, 8, 4)) for c in calls]
    save_carry(tmp_path, ChainState(3, calls, fp_calls), store)
    fresh = ActivationStore()
    state = load_carry(tmp_path / "carry-3", fresh)
    assert state.next_block == 3 and isinstance(state.calls[0].args[0], Ref)
    for got, want in zip(state.calls + state.fp_calls, calls + fp_calls):
        assert torch.equal(fresh.resolve(got.args[0]), store.resolve(want.args[0]))
        assert torch.equal(got.kwargs["position_embeddings"][1], want.kwargs["position_embeddings"][1])
        assert got.kwargs["attention_mask"].dtype == torch.bool and (got.kwargs["use_cache"], got.kwargs["n"], got.kwargs["p"]) == (False, 3, None)
    with pytest.raises(CompressKitError, match="cannot write down"):
        save_carry(tmp_path, ChainState(0, [Call((object(),), {})], []), store)


def test_streaming_refuses_what_needs_the_whole_model(llama_dir, tmp_path):
    adapter = CausalLMAdapter()
    with pytest.raises(CompressKitError, match="whole-model EM rounds"):
        compress_streaming(str(llama_dir()), tmp_path / "o", adapter=adapter, calibration=CalibrationConfig.preset("best"))
    with pytest.raises(CompressKitError, match="GGUF"):
        compress_streaming(None, tmp_path / "o", adapter=adapter)
    (tmp_path / "exists").mkdir()
    with pytest.raises(CompressKitError, match="already exists"):
        compress_streaming(str(llama_dir()), tmp_path / "exists", adapter=adapter)
    with pytest.raises(CompressKitError, match="preparation options .* cannot go with --stream"):
        compress_streaming(str(llama_dir()), tmp_path / "o", CompressConfig(prepare={"prune": 0.5}), adapter=adapter)
    from compresskit.adapters import get_adapter

    with pytest.raises(CompressKitError, match="cannot stream"):
        compress_streaming("x", tmp_path / "o", adapter=get_adapter("dit")())
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


RUNNER = textwrap.dedent("""
    import os, signal, sys
    import compresskit.cli.streamed as streamed
    from compresskit.cli.main import main

    kill_at = int(os.environ["KILL_AT"])

    def killer(name, i, total):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    streamed._layer_progress = lambda quiet: (None, killer)
    main(sys.argv[1:])
""")


def cli(*args, env=None, runner=None):
    command = [sys.executable, "-c", runner, *args] if runner else [sys.executable, "-m", "compresskit", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("kill_at", [10, 14])  # in block 1, after 3 of its 7 layers; as block 2 begins
def test_a_killed_run_resumes_bit_identical(llama_dir, tmp_path, kill_at):
    model = str(llama_dir())
    args = ["quantize", "--model", model, "--method", "pq", "--bits", "2", *CLI_CALIB]
    whole = cli(*args, "--stream", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    killed = cli(*args, "--stream", "--out", str(out), env={"KILL_AT": str(kill_at)}, runner=RUNNER)
    assert killed.returncode == -9
    assert not out.exists()  # never looks complete
    progress = json.loads((partial_dir(out) / "progress.json").read_text())
    assert progress["blocks_done"] == kill_at // 7
    again = cli(*args, "--stream", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    other = cli(*args[:-len(CLI_CALIB)], "--calib-samples", "8", "--calib-set", "batch_size=2", "--option", "seq_len=32", "--no-eval", "--resume", "--out", str(out))
    assert other.returncode == 2 and "other settings (calibration)" in other.stderr
    resumed = cli(*args, "--resume", "--out", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["streamed"]["resumed_from_block"] == kill_at // 7
    assert_same_model(out, tmp_path / "whole")
    assert not partial_dir(out).exists()


def test_load_with_the_lut_kernel_computes_the_same_tokens(llama_dir, tmp_path):
    compress_streaming(str(llama_dir()), tmp_path / "o", CompressConfig(method="pq", bits=2), adapter=CausalLMAdapter())
    plain, fast = io.load(tmp_path / "o"), io.load(tmp_path / "o", lut=True)
    served = [n for n, m in fast.named_modules() if "forward" in m.__dict__]
    assert len(served) == 28 and not [n for n, m in plain.named_modules() if "forward" in m.__dict__]
    ids = torch.arange(5).unsqueeze(0)
    with torch.no_grad():
        a = plain.generate(ids, max_new_tokens=6, do_sample=False)
        b = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tied", [False, True])
def test_a_compressed_model_loads_without_a_dense_skeleton(llama_dir, tmp_path, tied):
    model_dir = llama_dir(tied)
    compress_streaming(str(model_dir), tmp_path / "o", CompressConfig(method="rtn", bits=2), adapter=CausalLMAdapter())
    built: list[torch.Tensor] = []
    original = CausalLMAdapter.load_architecture

    def spy(self, directory):  # what load_compressed builds before any tensor is read
        loaded = original(self, directory)
        built.extend(loaded.model.parameters())
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CausalLMAdapter, "load_architecture", spy)
        model = io.load(tmp_path / "o")
    assert built and all(p.is_meta for p in built)  # the skeleton held no float32 weights
    tensors = list(model.state_dict().values()) + list(model.parameters()) + list(model.buffers())
    assert not [t for t in tensors if t.is_meta]
    if tied:  # one Parameter again, as transformers ties it
        assert model.lm_head.weight is model.model.embed_tokens.weight
    skeleton = CausalLMAdapter().load_architecture(tmp_path / "o" / io.ARCHITECTURE).model
    ids = torch.arange(9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, io.load(tmp_path / "o", model=skeleton)(input_ids=ids).logits)


def test_rebuilt_weights_are_cached_only_where_they_fit(llama_dir, tmp_path, monkeypatch):
    compress_streaming(str(llama_dir()), tmp_path / "o", CompressConfig(method="rtn", bits=2), adapter=CausalLMAdapter())
    ids = torch.arange(7).unsqueeze(0)

    def cached_after_a_call(model) -> list[bool]:
        with torch.no_grad():
            model(input_ids=ids)
        return [qt._cache is not None for _, _, qt in quantized_tensors(model).values()]

    assert all(cached_after_a_call(io.load(tmp_path / "o")))  # a tiny model fits: the default caches
    assert not any(cached_after_a_call(io.load(tmp_path / "o", cache=False)))
    assert io.dense_fits(1) and not io.dense_fits(2**60)
    monkeypatch.setattr(io, "dense_fits", lambda n_bytes: False)  # as a 7B on a 24 GB machine
    rebuilt = io.load(tmp_path / "o")
    assert not any(cached_after_a_call(rebuilt))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, io.load(tmp_path / "o", cache=True)(input_ids=ids).logits)
