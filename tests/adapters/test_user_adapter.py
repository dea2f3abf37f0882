"""The worked example of docs/adapters.md, run for real: a user's own model family through the API."""
import torch
from safetensors.torch import save_file

import compresskit
from compresskit import CalibrationConfig, CompressConfig
from compresskit.nn import is_quantized

# ---- the adapter exactly as in docs/adapters.md (not registered: tests must not leak names) ----
import torch
from safetensors.torch import load_file
from torch import nn

from compresskit.adapters import Adapter, DataSpec, EvalSpec, LoadedModel, Option
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
    primary_metric = "mse"
    eval_options = {"n_points": Option(4096, "points in the evaluation set")}

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

    def calibration_batches(self, loaded, data: DataSpec):
        x, _ = self._data(data.n_samples, seed=1000 + data.seed)  # evaluation uses seed 0: disjoint
        return [{"x": row.unsqueeze(0)} for row in x]

    def task_loss(self, model, batch):
        x = batch["x"]
        return nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))

    def evaluate(self, loaded, spec: EvalSpec):
        x, y = self._data(spec.options["n_points"], seed=0)
        with torch.no_grad():
            return {"mse": nn.functional.mse_loss(loaded.model(x), y).item()}


def test_user_adapter_end_to_end(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tinymlp.safetensors"
    save_file(TinyMLP().state_dict(), str(path))
    adapter = TinyMLPAdapter()
    loaded = adapter.load(str(path))
    before = adapter.evaluate(loaded, adapter.eval_spec())

    # GPTQ at 3 bits, calibrated block by block on 64 of the adapter's samples
    report = compresskit.compress(
        loaded, CompressConfig(method="gptq", bits=3), adapter=adapter,
        calibration=CalibrationConfig(n_samples=64),
    )
    after = adapter.evaluate(loaded, adapter.eval_spec())
    assert report.graph_method == "symbolic_trace"
    assert all(is_quantized(loaded.model.layers[i], "weight") for i in range(4))
    assert not is_quantized(loaded.model.head, "weight") and "head" in report.kept_dense  # kept dense by the adapter
    assert after["mse"] < 10 * max(before["mse"], 1e-3)

    compresskit.save(loaded.model, report, tmp_path / "out", source={"model": str(path)})
    restored = compresskit.load(tmp_path / "out", model=TinyMLP())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), loaded.model(x), rtol=0, atol=0)


def test_without_an_adapter_calibration_runs_layer_by_layer_on_the_callers_inputs():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    g = torch.Generator().manual_seed(3)
    A = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64)  # correlated inputs: GPTQ has room to win
    data = [{"x": torch.randn(128, 64, generator=g) @ A} for _ in range(4)]
    x = torch.cat([b["x"] for b in data])
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for name, calibration in (("weights only", None), ("layer objective", CalibrationConfig())):
        m = TinyMLP().eval()
        m.load_state_dict(model.state_dict())
        compresskit.compress(m, CompressConfig(method="gptq", bits=2), calibration=calibration, calibration_data=data if calibration else None)
        with torch.no_grad():
            errors[name] = float((m(x) - ref).pow(2).mean())
    assert errors["layer objective"] < 0.8 * errors["weights only"], errors


def test_without_an_adapter_the_task_objective_is_one_clear_error():
    import pytest

    with pytest.raises(CompressKitError, match="needs an adapter"):
        compresskit.compress(
            TinyMLP(), CompressConfig(method="pq", bits=2),
            calibration=CalibrationConfig(m_objective="task", em_rounds=1, m_steps=2), calibration_data=[{"x": torch.randn(4, 64)}],
        )
    with pytest.raises(CompressKitError, match="calibration needs data"):
        compresskit.compress(TinyMLP(), CompressConfig(method="pq", bits=2), calibration=CalibrationConfig())
