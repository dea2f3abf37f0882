"""``python distributed_driver.py quantize ...``: the compresskit command, with what a test needs to see.

Run once in one process and once under torchrun (or with RANK / WORLD_SIZE set by hand) by
``test_distributed.py``. With ``RECORD_DIR`` set, every layer fit of this rank records the exact
statistics and target it was given (``H``, the weight aimed at; ``fit<k>`` for its k-th fit) and
every block error, in ``RECORD_DIR/rank<R>.safetensors`` / ``.json``; with ``FAIL_RANK`` set, that rank raises in its
first layer fit (``FAIL_KIND``: ``runtime`` or ``compresskit``).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import compresskit.calib.walk as walk
from compresskit.cli.main import main
from compresskit.errors import CompressKitError

torch.set_num_threads(1)  # the same in every run: a matmul's result may depend on the thread count
rank = int(os.environ.get("RANK", "0"))
record_dir = os.environ.get("RECORD_DIR")
tensors: dict[str, torch.Tensor] = {}
errors: dict[str, float] = {}
fit_layer, record_error = walk.fit_layer, walk.Walk._record_error


def recording_fit(quantizer, W, H, config):
    if os.environ.get("FAIL_RANK") == str(rank):
        kind = CompressKitError if os.environ.get("FAIL_KIND") == "compresskit" else RuntimeError
        raise kind(f"injected failure on rank {rank}")
    key = f"fit{len(tensors) // 2}"
    tensors[f"{key}.H"], tensors[f"{key}.goal"] = H.clone(), W.clone()
    return fit_layer(quantizer, W, H, config)


def recording_error(self, block_name, outs, reference):
    record_error(self, block_name, outs, reference)
    errors[block_name] = self.block_errors[block_name]


walk.fit_layer = recording_fit
walk.Walk._record_error = recording_error
try:
    main(sys.argv[1:])
finally:
    if record_dir:
        save_file(tensors, os.path.join(record_dir, f"rank{rank}.safetensors"))
        with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
