"""Asymmetric calibration: layers of the compressed model match the *original* model's outputs."""
import pytest
import torch

import compresskit
from compresskit.calib.capture import Call
from compresskit.nn import quantized_of
from compresskit.targets import Target
from compresskit import CompressConfig
from compresskit.calib.hessian import asymmetric_target
from compresskit.calib import Calibrator, CalibrationConfig
from compresskit.errors import CompressKitError

from toy_models import Attentionish, Block, Residual


def _streams(n=12, m=5, N=400, drift=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g) @ torch.randn(n, n, generator=g)  # original inputs
    Xq = X + drift * torch.randn(N, n, generator=g)  # the compressed model's inputs
    W = torch.randn(m, n, generator=g)
    return X.double(), Xq.double(), W.double()


def test_target_is_the_least_squares_weight_and_shifts_the_objective_by_a_constant():
    X, Xq, W = _streams()
    N = X.shape[0]
    H, G = Xq.T @ Xq / N, Xq.T @ X / N
    T = asymmetric_target(W, H, G, damp=0.0).double()
    lstsq = torch.linalg.lstsq(Xq, X @ W.T).solution.T  # argmin |Xq T^T - X W^T|
    torch.testing.assert_close(T, lstsq, rtol=1e-4, atol=1e-4)

    def true_loss(W_hat):
        return float((Xq @ W_hat.T - X @ W.T).pow(2).sum()) / N

    def proxy(W_hat):
        R = W_hat - T
        return float(((R @ H) * R).sum())

    a, b = W + 0.1 * torch.randn_like(W), W - 0.2 * torch.randn_like(W)
    assert true_loss(a) - true_loss(b) == pytest.approx(proxy(a) - proxy(b), rel=1e-3)


def test_same_inputs_give_the_weight_itself_and_bad_shapes_are_refused():
    X, _, W = _streams()
    H = X.T @ X / X.shape[0]
    assert torch.equal(asymmetric_target(W.float(), H.float(), H.float()), W.float())
    with pytest.raises(CompressKitError, match="must be"):
        asymmetric_target(W, H[:3, :3], H)


def test_banded_target_equals_the_dense_formula(monkeypatch):
    """The target is built a band of rows at a time (no [n, n] float64 temporary but the factor):
    with bands of a few rows it is the closed form ``W + W (G - H)^T (H + lambda I)^{-1}``."""
    from compresskit.calib import hessian

    X, Xq, W = _streams(n=37, m=11)
    N = X.shape[0]
    H, G = (Xq.T @ Xq / N).float(), (Xq.T @ X / N).float()
    dense = asymmetric_target(W.float(), H, G, damp=0.3)
    real = hessian.row_bands
    monkeypatch.setattr(hessian, "row_bands", lambda size, width: real(size, width, budget=3 * width))
    assert len(hessian.row_bands(37, 37)) == 13
    banded = asymmetric_target(W.float(), H, G, damp=0.3)
    Hd = H.double() + 0.3 * H.double().diagonal().mean() * torch.eye(37, dtype=torch.float64)
    formula = W + W @ (G.double() - H.double()).T @ torch.linalg.inv(Hd + 1e-12 * torch.eye(37, dtype=torch.float64))
    torch.testing.assert_close(banded.double(), formula, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(banded, dense, rtol=1e-6, atol=1e-6)
    assert banded.dtype == torch.float32 and banded.shape == W.shape


def _held_out_error(config, method="gptq", params=None, block=Block, width=24, depth=4, n_batches=4):
    """Compress a seeded chained toy model with ``config``; its mean squared output error against the
    uncompressed model on held-out inputs, the compressed model and its calibrator."""
    torch.manual_seed(0)
    base = Residual(width, depth, block).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(64, width, generator=g)} for _ in range(n_batches)]
    held_out = torch.randn(256, width, generator=g)
    model = Residual(width, depth, block).eval()
    model.load_state_dict(base.state_dict())
    cal = Calibrator([f"blocks.{i}" for i in range(depth)], batches, config=config)
    compresskit.compress(model, CompressConfig(method=method, bits=2, params=params or {}), calibration=cal)
    with torch.no_grad():
        return float((model(held_out) - base(held_out)).pow(2).mean()), model, cal


@pytest.mark.parametrize("method,params", [("gptq", {}), ("pq", {"pool": False, "k": 16})])
def test_asymmetric_walk_tracks_the_original_model_better(method, params):
    errors = {}
    for asymmetric in (False, True):
        rounds = {"local_rounds": 1} if method == "pq" else {}  # GPTQ has no layer-wise rounds
        errors[asymmetric], _, cal = _held_out_error(CalibrationConfig(asymmetric=asymmetric, **rounds), method, params)
        assert cal.asymmetric is asymmetric
    assert errors[True] < errors[False]


def test_first_block_sees_no_drift_so_its_layer_is_compressed_as_before():
    _, sym, _ = _held_out_error(CalibrationConfig(asymmetric=False), n_batches=2)
    _, asym, _ = _held_out_error(CalibrationConfig(asymmetric=True), n_batches=2)
    assert torch.equal(quantized_of(sym.blocks[0].fc, "weight").codes, quantized_of(asym.blocks[0].fc, "weight").codes)
    assert not torch.equal(quantized_of(sym.blocks[3].fc, "weight").codes, quantized_of(asym.blocks[3].fc, "weight").codes)


def test_statistics_group_layers_that_read_one_input_into_stages_in_execution_order():
    block = Attentionish().eval()
    cal = Calibrator(["b"], [{"x": torch.randn(4, 16)}])
    calls = [Call((torch.randn(8, 16),), {})]
    names = [f"b.{n}" for n in ("down", "up", "gate", "o", "v", "k", "q")]  # any order in
    targets = [Target(n, n, "weight", "linear", tuple(block.get_submodule(n[2:]).weight.shape)) for n in names]
    stats = cal.walk._statistics(block, "b", targets, calls, None, None)
    assert stats.stages == [["b.q", "b.k", "b.v"], ["b.o"], ["b.gate", "b.up"], ["b.down"]]
    assert stats.crosses == {} and stats.fp_outputs is None
    h = torch.nn.functional.layer_norm(calls[0].args[0], (16,))
    torch.testing.assert_close(stats.hessians["b.q"], h.T @ h / 8)


def test_stage_finder_groups_by_the_tensor_read_and_keeps_no_input_alive():
    import gc
    import weakref

    from compresskit.calib.walk import StageFinder

    finder = StageFinder()
    x = torch.randn(4, 3)
    finder.see("q", x)
    finder.see("k", x)
    finder.see("q", torch.randn(4, 3))  # a layer's later calls do not move it
    y = torch.randn(4, 3)
    finder.see("o", y)
    probe = weakref.ref(y)
    del y
    gc.collect()
    assert probe() is None  # the finder did not hold it
    finder.see("up", torch.randn(4, 3))  # a new tensor, even if it reuses the freed one's memory
    assert finder.stages == [["q", "k"], ["o"], ["up"]]
    assert "k" in finder and "down" not in finder


@pytest.mark.parametrize("asymmetric", [False, True])
def test_sequential_stages_see_the_compressed_earlier_layers(asymmetric):
    errors = {
        sequential: _held_out_error(CalibrationConfig(asymmetric=asymmetric, sequential=sequential), block=Attentionish, width=16, depth=3)[0]
        for sequential in (False, True)
    }
    assert errors[True] < errors[False]


def test_the_asymmetric_ridge_must_be_positive():
    with pytest.raises(CompressKitError, match="asym_damp must be > 0"):
        CalibrationConfig(asym_damp=0.0).validated()
