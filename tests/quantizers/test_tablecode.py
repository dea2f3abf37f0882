"""8-bit centroid tables (``table_bits=8``): the grid, exact bytes, exact round trips through the
file, and every path that writes a table (fit, setters, the M-step) leaving it on its grid."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compresskit
from compresskit import CompressConfig
from compresskit.calib.objectives import settle, trainable_tensors
from compresskit.errors import CompressKitError
from compresskit.nn import quantized_tensors
from compresskit.registry import get_quantizer
from compresskit.quantizers import tablecode
from compresskit.quantizers.base import load_quantizer


def weight(rows=256, cols=32, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def on_grid(q) -> bool:
    """Is the quantizer's table exactly ``lo + step * level`` for its stored grid?"""
    layout = q.codebook_layout()
    lo, step = getattr(q, layout.table_name + "grid_").split(1, dim=-2)
    return torch.equal(tablecode.decode(tablecode.quantize(layout.table, lo, step), lo, step), layout.table)


@pytest.mark.parametrize("method, params", [
    ("pq", {"bits": 2, "pool": False}),
    ("pq", {"bits": 2, "pool": True, "pool_size": 64}),
    ("pq", {"bits": 2, "pool": False, "row_scale": True}),
    ("vq", {"bits": 1, "d": 4, "row_groups": 2}),
])
def test_an_8bit_table_halves_the_table_bytes_and_the_file_rebuilds_it_exactly(method, params, tmp_path):
    W = weight()
    wide = get_quantizer(method)(**params).fit(W)
    q = get_quantizer(method)(**params, table_bits=8).fit(W)
    name = q.codebook_layout().table_name
    table_key = {"codebooks_": "codebooks", "pool_": "pool"}[name]
    entries, d = q.codebook_layout().table.reshape(-1, q.codebook_layout().d).shape
    books = 1 if name == "pool_" else q.codebook_layout().table.shape[0]
    assert q.size_report().parts_bits[table_key] == entries * d * 8 + books * d * 32  # levels, then lo and step in float16
    assert wide.size_report().parts_bits[table_key] == entries * d * 16
    assert on_grid(q) and q.codebook_layout().table.dtype == torch.float16
    # the levels are fine: the weight error moves by well under a percent of the float16 table's
    err = lambda x: float((x.inverse_transform(x.transform(W)) - W).norm() / W.norm())  # noqa: E731
    assert err(q) == pytest.approx(err(wide), rel=0.02)

    q.save(tmp_path / "q.safetensors")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "q.safetensors"))
    assert stored[name + "q_"].dtype == torch.uint8 and name not in stored and stored[name + "grid_"].dtype == torch.float16
    back = load_quantizer(tmp_path / "q.safetensors")
    assert torch.equal(back.codebook_layout().table, q.codebook_layout().table)
    assert torch.equal(back.inverse_transform(back.codes_), q.inverse_transform(q.codes_))
    assert back.size_report() == q.size_report()
    # the file holds what the report counts: the table's bytes are its levels plus the grid
    assert stored[name + "q_"].numel() * 8 + stored[name + "grid_"].numel() * 16 == q.size_report().parts_bits[table_key]


def test_the_setters_and_settle_keep_the_table_on_its_grid_and_a_table_off_it_is_not_saved(tmp_path):
    q = get_quantizer("pq")(bits=2, pool=False, table_bits=8).fit(weight())
    table = q.codebook_layout().table
    q.set_centroids(table.float() * 1.37 + 0.011)  # a new range: the grid follows it
    assert on_grid(q)
    with torch.no_grad():
        table.add_(1e-3)  # written behind the quantizer's back, as an optimiser step does
    assert not on_grid(q)
    with pytest.raises(CompressKitError, match="off its 8-bit grid"):
        q.save(tmp_path / "q.safetensors")
    q.settle()
    before = table.clone()
    assert on_grid(q)
    q.settle()  # settling a settled table changes nothing
    assert torch.equal(table, before)
    q.save(tmp_path / "q.safetensors")


@pytest.mark.parametrize("value", [12, 0, "8", True])
def test_table_bits_other_than_16_or_8_is_one_clear_error(value):
    with pytest.raises(CompressKitError, match="table_bits must be 16"):
        get_quantizer("pq")(bits=2, table_bits=value).fit(weight())


def test_the_m_step_trains_the_table_not_its_grid_and_leaves_it_on_the_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": False, "table_bits": 8}))
    modules = [qt for _, _, qt in quantized_tensors(model).values()]
    trained = {id(p) for p, _ in trainable_tensors(model)}
    for qt in modules:
        tensors = qt.state_tensors()
        assert id(tensors["codebooks_"]) in trained and id(tensors["codebooks_grid_"]) not in trained
    x = torch.randn(64, 32)
    target = torch.randn(64, 8)
    from compresskit.calib.config import CalibrationConfig
    from compresskit.calib.objectives import optimise

    optimise(trainable_tensors(model), lambda step: (model(x) - target).pow(2).mean(), CalibrationConfig(m_steps=5, lr=1e-2))
    assert not all(on_grid(qt.bind()) for qt in modules)  # plain steps leave the grid ...
    settle(model)
    assert all(on_grid(qt.bind()) for qt in modules)  # ... and settle puts every table back
