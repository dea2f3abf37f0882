"""Run by test_memory.py in a fresh process: peak resident memory of streamed runs, one after another.

``python memory_probe.py DIR...``: compresses each model directory in turn (gptq 2 bits, the walk on
2 calibration samples) and prints one JSON line ``{"peaks": [bytes above the RSS before that run]}``.
Memory freed by one run is reused by the next, so after a first run has paid the one-time costs
(imports, tokenizer, allocator arenas), a later run's peak shows what its model adds.
"""
import json
import sys
import threading
import time
from pathlib import Path

import torch

from compresskit import CalibrationConfig, CompressConfig
from compresskit.adapters.lm.adapter import CausalLMAdapter
from compresskit.stream import compress_streaming


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    torch.set_num_threads(1)
    peaks = []
    for directory in map(Path, sys.argv[1:]):
        before, peak, running = rss(), [0], [True]

        def sample() -> None:
            while running[0]:
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        compress_streaming(str(directory), directory.parent / f"{directory.name}-out", CompressConfig(method="gptq", bits=2), adapter=CausalLMAdapter(),
                           calibration=CalibrationConfig(n_samples=2, batch_size=2, options={"seq_len": 32}), overwrite=True)
        running[0] = False
        thread.join()
        peaks.append(peak[0] - before)
    print(json.dumps({"peaks": peaks}))


if __name__ == "__main__":
    main()
