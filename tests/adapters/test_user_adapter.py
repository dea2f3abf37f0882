"""The worked example of docs/adapters.md, run for real: a user's own model family through the API."""
import torch
from safetensors.torch import save_file

import compresskit
from compresskit import CompressConfig
from compresskit.calib import Calibrator, CalibrationConfig
from compresskit.nn import QuantizedLinear

# ---- the adapter exactly as in docs/adapters.md (not registered: tests must not leak names) ----
import torch
from safetensors.torch import load_file
from torch import nn

from compresskit.adapters import Adapter, LoadedModel, register_adapter
from compresskit.errors import CompressKitError


class TinyMLP(nn.Module):
    def __init__(self, width=64, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class TinyMLPAdapter(Adapter):
    keep_dense = (("head", "one output row: nothing to gain, and every error lands in the prediction"),)

    def load(self, spec):
        if spec is None:
            raise CompressKitError("tinymlp needs a model file; pass the path of a .safetensors checkpoint")
        model = TinyMLP()
        model.load_state_dict(load_file(spec))
        return LoadedModel(model=model.float().eval(), source=spec, resolved=spec)

    def blocks(self, model):
        return [f"layers.{i}" for i in range(len(model.layers))]

    def example_inputs(self, loaded):
        return (torch.zeros(1, 64),), {}

    def _data(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 64, generator=gen)
        return x, x.sum(dim=1, keepdim=True)

    def calibration_batches(self, loaded, source, n_samples, seq_len, seed=0):
        x, _ = self._data(n_samples, seed=1000 + seed)   # evaluation uses seed 0: disjoint
        return [{"x": row.unsqueeze(0)} for row in x]

    def task_loss(self, model, batch):
        x = batch["x"]
        return nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))

    def evaluate(self, loaded, source=None, n_tokens=8192, window=512):
        x, y = self._data(n_tokens, seed=0)
        with torch.no_grad():
            return {"mse": nn.functional.mse_loss(loaded.model(x), y).item()}


def test_user_adapter_end_to_end(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tinymlp.safetensors"
    save_file(TinyMLP().state_dict(), str(path))
    adapter = TinyMLPAdapter()
    loaded = adapter.load(str(path))
    before = adapter.evaluate(loaded)

    calibrator = Calibrator(
        adapter.blocks(loaded.model),
        adapter.calibration_batches(loaded, None, n_samples=64, seq_len=1),
        adapter.task_loss,
        CalibrationConfig(),
    )
    args, kwargs = adapter.example_inputs(loaded)
    report = compresskit.compress(
        loaded.model,
        CompressConfig(method="gptq", bits=3),
        example_args=args, example_kwargs=kwargs,
        keep_dense=[pattern for pattern, _ in adapter.keep_dense],
        calibration=calibrator,
    )
    after = adapter.evaluate(loaded)
    assert report.graph_method == "symbolic_trace"
    assert all(isinstance(loaded.model.layers[i], QuantizedLinear) for i in range(4))
    assert type(loaded.model.head) is torch.nn.Linear  # kept dense by the adapter
    assert after["mse"] < 10 * max(before["mse"], 1e-3)

    compresskit.save(loaded.model, report, tmp_path / "out", source={"model": str(path)})
    restored = compresskit.load(tmp_path / "out", model=TinyMLP())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), loaded.model(x), rtol=0, atol=0)
