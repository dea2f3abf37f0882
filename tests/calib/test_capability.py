"""Calibration by capability: a codebook quantizer the package has never heard of, registered through
the public API, gets the E-step, the layer M-step, dead-centroid re-initialisation and soft
assignments; a quantizer without codebooks gets one clear error from each of them."""
import copy

import pytest
import torch

import compresskit
from compresskit.calib.codebook import refine_layer, update_codebooks, update_row_scales
from compresskit.calib.deadcode import reinit_dead, usage_counts
from compresskit.calib.estep import centroid_layout, e_step, output_error
from compresskit.calib.soft import SoftAssignment
from compresskit.errors import CompressKitError
from compresskit.quantizers import GPTQ, RTN, CodebookLayout, CodebookQuantizer, load_quantizer
from compresskit.registry import QUANTIZERS

NAME = "test-scalar-codebook"


class ScalarCodebook(CodebookQuantizer):
    """Test-only: one 1-D k-means codebook of ``2 ** bits`` levels per block of rows (so d = 1).

    State: ``codes_ [m, n]`` uint8, ``levels_ [row_groups, k, 1]`` float16.
    """

    _state_tensors = ("levels_",)

    def __init__(self, bits: int = 2, row_groups: int = 1, n_iter: int = 15):
        self.bits = bits
        self.row_groups = row_groups
        self.n_iter = n_iter

    def _validate_params(self) -> None:
        if self.bits not in (1, 2, 3, 4):
            raise CompressKitError(f"{self.name}: bits must be 1, 2, 3 or 4, got {self.bits!r}")

    @property
    def code_bits_(self) -> int:
        return self.bits

    def _size(self, shape):
        rows, cols = shape
        return {"codes": rows * cols * self.bits, "codebooks": self.row_groups * 2**self.bits * 16}

    def _fit(self, W):
        X = W.reshape(self.row_groups, -1)  # [G, rows per group * n]: a group's rows are consecutive
        k = 2**self.bits
        levels = torch.quantile(X, torch.linspace(0, 1, k + 2)[1:-1], dim=1).t().contiguous()  # [G, k]
        for _ in range(self.n_iter):  # Lloyd in 1-D
            codes = (X[:, :, None] - levels[:, None, :]).abs().argmin(-1)  # [G, N]
            sums = torch.zeros_like(levels).scatter_add_(1, codes, X)
            counts = torch.zeros_like(levels).scatter_add_(1, codes, torch.ones_like(X))
            levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        self.levels_ = levels.to(torch.float16)[..., None]  # [G, k, 1]

    def _transform(self, W):
        X = W.reshape(self.row_groups, -1)
        codes = (X[:, :, None] - self.levels_.float()[:, None, :, 0]).abs().argmin(-1)
        return codes.reshape(W.shape).to(torch.uint8)

    def _group(self, m: int) -> torch.Tensor:
        return torch.arange(m) // (m // self.row_groups)  # [m] the book of each row

    def _inverse(self, codes):
        return self.levels_.float()[self._group(codes.shape[0])[:, None], codes.long(), 0]  # [m, n]

    def codebook_layout(self) -> CodebookLayout:
        self._check_fitted()
        m, n = self.codes_.shape
        G, k, _ = self.levels_.shape
        book = self._group(m)[:, None].expand(m, n).contiguous()
        return CodebookLayout(self.levels_, "levels_", torch.arange(G * k).reshape(G, k), book, k, 1)


@pytest.fixture
def scalar_cb():
    compresskit.register_quantizer(NAME)(ScalarCodebook)
    yield compresskit.get_quantizer(NAME)
    QUANTIZERS._classes.pop(NAME)  # no name leaks into other tests


def layer(seed: int = 0):
    """A weight [48, 24] with rows of unequal size, and H = X^T X / N of correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 24, generator=gen) * torch.rand(48, 1, generator=gen).mul(3).add(0.2)
    X = torch.randn(512, 24, generator=gen) @ (torch.randn(24, 24, generator=gen) + 0.5 * torch.eye(24))
    return W, X, X.T @ X / X.shape[0]


def error_of(q, W, H) -> float:
    return output_error(W, q.inverse_transform(), H)


def test_registered_through_the_public_api(scalar_cb, tmp_path):
    assert scalar_cb is ScalarCodebook and scalar_cb.supports_codebook_update and not scalar_cb.uses_hessian
    W, _, _ = layer()
    q = scalar_cb(bits=2, row_groups=2).fit(W)
    q.save(tmp_path / "q.safetensors")
    assert torch.equal(load_quantizer(tmp_path / "q.safetensors").inverse_transform(), q.inverse_transform())


def test_e_step_lowers_the_output_error(scalar_cb):
    W, _, H = layer()
    q = scalar_cb(bits=2, row_groups=2).fit(W)
    before = error_of(q, W, H)
    q.set_codes(e_step(q, W, H, n_sweeps=3))
    assert error_of(q, W, H) < 0.9 * before


def test_refine_layer_lowers_the_output_error_in_place(scalar_cb):
    W, _, H = layer(1)
    q = scalar_cb(bits=2, row_groups=2).fit(W)
    levels, codes = q.codebook_layout().table, q.codes_
    errors = refine_layer(q, W, H, rounds=3)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])) and errors[-1] < 0.8 * errors[0]
    assert error_of(q, W, H) == pytest.approx(errors[-1], rel=1e-4)
    assert q.codebook_layout().table is levels and q.codes_ is codes  # written through the setters
    assert update_row_scales(q, W, H) != update_row_scales(q, W, H)  # no row scales: (nan, nan)


def test_a_dead_level_is_reseeded_and_then_used(scalar_cb):
    W, _, H = layer(2)
    q = scalar_cb(bits=2, row_groups=2).fit(W)
    usage = usage_counts(q)
    assert usage.shape == (2, 4) and int(usage.sum()) == W.numel()
    far = q.codebook_layout().table.float().clone()
    far[0, 0] = 100.0  # a level no weight is near
    q.set_centroids(far)
    q.set_codes(q.transform(W))  # nearest levels: nothing uses it
    assert usage_counts(q)[0, 0] == 0
    kept = copy.deepcopy(q)
    kept.set_codes(e_step(kept, W, H, n_sweeps=2))
    assert reinit_dead(q, W, usage_counts(q), tau_dead=1, seed=0) == 1
    assert q.codebook_layout().table[0, 0, 0].abs() < 100  # moved onto a badly reconstructed weight
    q.set_codes(e_step(q, W, H, n_sweeps=2))
    assert usage_counts(q)[0, 0] > 0 and error_of(q, W, H) < error_of(kept, W, H)


def test_soft_assignments_train_and_write_back_in_place(scalar_cb):
    W, X, _ = layer(3)
    q = scalar_cb(bits=2, row_groups=2).fit(W)
    target = X @ W.T

    def loss_of(weight):
        return (X @ weight.T - target).pow(2).mean()

    start = float(loss_of(q.inverse_transform()))
    soft = SoftAssignment(q, W, n_candidates=3)
    opt = torch.optim.Adam(soft.parameters(), lr=0.05)
    for step in range(60):
        opt.zero_grad()
        (loss_of(soft.weight()) + 3.0 * step / 60 * start * soft.entropy()).backward()
        opt.step()
    levels, codes = q.codebook_layout().table, q.codes_
    soft.write_back(q)
    assert q.codebook_layout().table is levels and q.codes_ is codes  # same tensors, new values
    assert torch.equal(q.codes_, soft.harden())
    assert float(loss_of(q.inverse_transform().float())) < 0.9 * start


@pytest.mark.parametrize("make", [lambda: RTN(bits=2), lambda: GPTQ(bits=2)], ids=["rtn", "gptq"])
def test_a_quantizer_without_codebooks_gets_one_clear_error(make):
    W, _, H = layer()
    q = make().fit(W)
    usage = torch.zeros(4)
    steps = {
        "e_step": lambda: e_step(q, W, H),
        "refine_layer": lambda: refine_layer(q, W, H),
        "update_codebooks": lambda: update_codebooks(q, W, H),
        "update_row_scales": lambda: update_row_scales(q, W, H),
        "usage_counts": lambda: usage_counts(q),
        "reinit_dead": lambda: reinit_dead(q, W, usage),
        "SoftAssignment": lambda: SoftAssignment(q, W),
        "centroid_layout": lambda: centroid_layout(q),
    }
    for step, call in steps.items():
        with pytest.raises(CompressKitError, match=f"^{step}: the {q.name} quantizer does not support codebook updates") as info:
            call()
        assert "\n" not in str(info.value)


def test_the_front_door_calibrates_a_registered_quantizer_by_what_it_declares(scalar_cb):
    """Through compress(): the walk gives the test-only quantizer the E-step and layer-wise rounds
    (it declares supports_codebook_update), and the output error falls against weights-only fitting."""
    from compresskit import CalibrationConfig, CompressConfig

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16)).eval()
    g = torch.Generator().manual_seed(1)
    A = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)  # correlated inputs
    data = [{"input": torch.randn(256, 32, generator=g) @ A} for _ in range(2)]
    x = torch.cat([b["input"] for b in data])
    with torch.no_grad():
        ref = base(x)
    errors = {}
    for label, calibration in (("weights", None), ("calibrated", CalibrationConfig())):
        model = copy.deepcopy(base)
        report = compresskit.compress(model, CompressConfig(method=NAME, bits=2), calibration=calibration,
                                      calibration_data=data if calibration else None)
        assert {layer.method for layer in report.layers} == {NAME}
        with torch.no_grad():
            errors[label] = float((model(x) - ref).pow(2).mean())
    assert errors["calibrated"] < 0.9 * errors["weights"], errors
