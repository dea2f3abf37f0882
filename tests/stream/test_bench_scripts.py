"""The streaming benchmark's scripts, at tiny shapes: the checkpoint they write loads, the figures they print add up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_make_7b_shaped_and_stream_7b(tmp_path):
    model = tmp_path / "shaped"
    made = subprocess.run([sys.executable, str(BENCH / "make_7b_shaped.py"), "--out", str(model), "--layers", "3", "--hidden", "64",
                           "--intermediate", "128", "--heads", "4", "--vocab", "384", "--shard-gb", "0.0001"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    written = json.loads(made.stdout.strip().splitlines()[-1])
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert written["shards"] == len(set(index["weight_map"].values())) > 1
    key = "model.layers.2.mlp.down_proj.weight"
    with safe_open(str(model / index["weight_map"][key]), framework="pt") as f:
        down = f.get_tensor(key)
    assert tuple(down.shape) == (64, 128) and str(down.dtype) == "torch.float16" and 0.015 < float(down.float().std()) < 0.025
    args = [sys.executable, str(BENCH / "stream_7b.py"), "--model", str(model), "--seq-len", "32", "--calib-samples", "2", "--json", "--out", str(tmp_path / "o")]
    first = subprocess.run([*args, "--max-blocks", "2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    part = json.loads(first.stdout.strip().splitlines()[-1])
    assert (part["blocks_run"], part["blocks_total"], part["finished"]) == (2, 3, False) and not (tmp_path / "o").exists()
    rest = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr
    done = json.loads(rest.stdout.strip().splitlines()[-1])
    assert (done["blocks_run"], done["resumed_from"], done["finished"], done["within_bound"]) == (1, 2, True, True)
    assert done["fp32_block_bytes"] == (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) * 4  # q k v o, gate up down, two norms
    assert (tmp_path / "o" / "manifest.json").is_file()
