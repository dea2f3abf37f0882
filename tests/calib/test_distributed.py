"""Distributed compression (``docs/distributed.md``) on a tiny random LLaMA, 2 CPU processes (gloo).

Each case runs the real command twice, once in one process and once under torchrun, through
``distributed_driver.py`` (one thread per process in both: results may depend on the thread count),
and compares every saved tensor bit for bit. The driver also records what each layer fit was given
(``H`` and the weight it aimed at) and each block's output error: those must be bit-identical too,
which is where an unordered combination of the ranks' statistics would show first (the 3-bit
codes often hide a last-bit difference in ``H``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from compresskit.calib import CalibrationConfig, Calibrator  # noqa: E402
from compresskit.calib.sharded import refuse_undistributed  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

HERE = Path(__file__).parent
DRIVER = HERE / "distributed_driver.py"
WORLD = 2
# 7 batches of one sample: 4 lock-steps, rank 1 sits out the last; with fewer than 2 full steps an
# unordered combination could not show (0 + b0 + b1 is exact in any order)
CALIB = ("--calib-samples", "7", "--calib-set", "batch_size=1", "--option", "seq_len=16")
CASES = {
    "gptq-fast": ("--method", "gptq", "--bits", "3", *CALIB),
    "pq-fast": ("--method", "pq", "--bits", "2", "--param", "k=16", *CALIB),
    "pq-none": ("--method", "pq", "--bits", "2", "--param", "k=16", "--preset", "none"),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-block LLaMA (width 32, random weights, seed 0) with a tiny tokenizer, saved."""
    sys.path.insert(0, str(HERE.parent / "adapters" / "lm"))
    from tiny_lms import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, vocab_size=384, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # the compresskit of this checkout, not whichever one is installed
    path = os.pathsep.join([str(HERE.parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**out, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def quantize_args(model: Path, out: Path, case: tuple) -> list[str]:
    return ["quantize", "--model", str(model), "--no-eval", "--json", "--out", str(out), *case]


def single(args: list[str], record: Path | None = None) -> subprocess.CompletedProcess:
    extra = {"RECORD_DIR": str(record)} if record else {}
    return subprocess.run([sys.executable, str(DRIVER), *args], env=env(**extra), capture_output=True, text=True, timeout=120)


def torchrun(args: list[str], record: Path | None = None) -> subprocess.CompletedProcess:
    extra = {"RECORD_DIR": str(record)} if record else {}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    return subprocess.run([*launcher, str(DRIVER), *args], env=env(**extra), capture_output=True, text=True, timeout=120)


def by_hand(args: list[str], **extra) -> list[subprocess.CompletedProcess]:
    """The ranks started without torchrun's agent (which would kill the others when one fails): each
    must end on its own."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(DRIVER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra),
        )
        for r in range(WORLD)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)  # a hang fails here
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    """The ``error: ...`` lines on stderr (transformers' loading bars are there too)."""
    return [line for line in p.stderr.splitlines() if line.startswith("error:")]


def assert_same_tensors(a: Path, b: Path) -> int:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} saved tensors differ, e.g. {differ[:3]}"
    return len(ta)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_save_the_single_process_tensors_bit_for_bit(case, tiny_llama, tmp_path):
    rec1, rec2 = tmp_path / "rec1", tmp_path / "rec2"
    rec1.mkdir(), rec2.mkdir()
    one = single(quantize_args(tiny_llama, tmp_path / "one", CASES[case]), rec1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(quantize_args(tiny_llama, tmp_path / "two", CASES[case]), rec2)
    assert two.returncode == 0, two.stderr[-2000:]
    result = json.loads(two.stdout)  # rank 0's JSON only: the other rank printed nothing
    assert result["processes"] == WORLD
    assert result["report"]["n_layers_compressed"] == 14  # 7 per block
    assert assert_same_tensors(tmp_path / "one", tmp_path / "two") > 0

    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert {n: l["rel_error"] for n, l in m1["layers"].items()} == {n: l["rel_error"] for n, l in m2["layers"].items()}

    fits = load_file(str(rec1 / "rank0.safetensors"))
    shared = [load_file(str(rec2 / f"rank{r}.safetensors")) for r in range(WORLD)]
    if case.endswith("none"):
        assert not fits  # weights only: no statistics
        return
    assert len(fits) == 2 * 14 and sum(len(s) for s in shared) == len(fits)
    for r, got in enumerate(shared):
        assert got, f"rank {r} fitted no layer"
        for key, value in got.items():  # rank r's k-th fit is the walk's fit k * WORLD + r (round-robin owners)
            k, what = key.removeprefix("fit").split(".")
            want = fits[f"fit{int(k) * WORLD + r}.{what}"]
            assert torch.equal(value, want), f"rank {r}'s {key} differs from the single process's"
    errors = json.loads((rec1 / "rank0.json").read_text())
    assert errors and all(json.loads((rec2 / f"rank{r}.json").read_text()) == errors for r in range(WORLD))


class FakeComm:
    """Enough of a Comm for the checks that run before any collective."""

    rank, world, is_main = 0, WORLD, True

    def share(self, items):
        return list(items)[self.rank :: self.world]


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(m_objective="block", m_steps=2), "m_objective 'block'"),
        (dict(m_objective="task", m_steps=2, em_rounds=1), "m_objective 'task'"),
        (CalibrationConfig.preset("best").to_dict(), "m_objective 'distill'"),
        (CalibrationConfig.preset("zero-data").to_dict(), "m_objective 'block'"),
    ],
)
def test_settings_that_cannot_be_distributed_are_refused_by_name(settings, named):
    config = CalibrationConfig(**settings)
    with pytest.raises(CompressKitError, match=named) as err:
        refuse_undistributed(config)
    assert "\n" not in str(err.value)
    batches = [{"x": torch.zeros(1, 4)} for _ in range(4)]
    with pytest.raises(CompressKitError, match=named):
        Calibrator(["0"], batches, task_loss=lambda m, b: 0, config=config, distill=(None, None), comm=FakeComm())


def test_layer_by_layer_calibration_is_refused():
    with pytest.raises(CompressKitError, match="layer by layer"):
        Calibrator(None, [{"x": torch.zeros(1, 4)}] * 2, comm=FakeComm())


def test_fewer_batches_than_processes_is_refused():
    with pytest.raises(CompressKitError, match="2 processes need at least 2 calibration batches, got 1"):
        Calibrator(["0"], [{"x": torch.zeros(1, 4)}], comm=FakeComm())


def test_refused_setting_ends_every_rank_with_one_line(tiny_llama, tmp_path):
    ranks = by_hand(quantize_args(tiny_llama, tmp_path / "out", ("--preset", "best")))
    for r, p in enumerate(ranks):
        assert p.returncode == 2, (r, p.stderr[-2000:])
        lines = error_lines(p)
        assert len(lines) == 1 and "m_objective 'distill' cannot run distributed yet" in lines[0], (r, p.stderr[-2000:])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing, kind", [(1, "runtime"), (0, "compresskit")])
def test_a_failing_rank_ends_the_others_with_its_error(failing, kind, tiny_llama, tmp_path):
    """The failing rank raises in its first layer fit while the other waits for that layer: the other
    must not hang, and says which rank failed and why in one line."""
    ranks = by_hand(quantize_args(tiny_llama, tmp_path / "out", CASES["gptq-fast"]), FAIL_RANK=str(failing), FAIL_KIND=kind)
    message = f"rank {failing} of {WORLD}: injected failure on rank {failing}"
    for r, p in enumerate(ranks):
        assert p.returncode != 0, (r, p.stderr[-2000:])
        if r != failing:
            assert error_lines(p) == [f"error: {message}"] and "Traceback" not in p.stderr, (r, p.stderr[-2000:])
    assert f"injected failure on rank {failing}" in ranks[failing].stderr
    assert not (tmp_path / "out").exists()
