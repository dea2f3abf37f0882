"""The block-wise calibrator through the front door, on small models."""
from dataclasses import replace

import pytest
import torch
from torch import nn

import compresskit
from compresskit.nn import quantized_of
from compresskit import CompressConfig
from compresskit.calib.estep import output_error
from compresskit.calib import Calibrator, CalibrationConfig
from compresskit.calib.capture import is_chained
from compresskit.calib.objectives import trainable_tensors
from compresskit.errors import CompressKitError


class Chain(nn.Module):
    """Blocks with something (a ReLU and a scale) between them: not chained."""

    def __init__(self, width=32, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x)) * 1.5
        return x


def correlated_batches(n=6, rows=64, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(width, width, generator=g) * torch.logspace(0, -2, width).unsqueeze(1)
    return [{"x": torch.randn(rows, width, generator=g) @ A} for _ in range(n)]


def test_gptq_through_calibrator_beats_rtn_on_the_output():
    torch.manual_seed(0)
    base = Chain().eval()
    batches = correlated_batches()
    x = torch.cat([b["x"] for b in batches])
    ref = base(x)
    errors = {}
    for method, calibrate in (("rtn", False), ("gptq", True)):
        model = Chain().eval()
        model.load_state_dict(base.state_dict())
        cal = Calibrator([f"layers.{i}" for i in range(3)], batches) if calibrate else None
        compresskit.compress(model, CompressConfig(method=method, bits=2), calibration=cal)
        with torch.no_grad():
            errors[method] = float((model(x) - ref).pow(2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_unchained_blocks_get_their_real_inputs():
    """The second block's Hessian must come from relu(...)*1.5 of the first block's output."""
    torch.manual_seed(0)
    model = Chain().eval()
    batches = correlated_batches()
    x = torch.cat([b["x"] for b in batches])
    with torch.no_grad():
        h1 = torch.relu(model.layers[0](x)) * 1.5
    blocks = [f"layers.{i}" for i in range(3)]
    cal2 = Calibrator(blocks, batches, config=CalibrationConfig(em_rounds=1))
    assert not is_chained(model, blocks, batches[0])
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    compresskit.compress(model, CompressConfig(method="vq", bits=4, params={"d": 2, "k": 64}), calibration=cal2)
    H1 = cal2.hessians["layers.1"]
    # unchained blocks: every block's inputs come from the uncompressed model, captured in one pass
    torch.testing.assert_close(H1, h1.T @ h1 / h1.shape[0], rtol=1e-4, atol=1e-5)
    assert len(calls) == 1 + len(batches), "one pass to check chaining, then one per batch to capture every block"


def test_pq_e_step_lowers_output_error_against_plain_kmeans():
    torch.manual_seed(0)
    base = Chain(width=64, depth=1).eval()
    batches = correlated_batches(width=64, rows=256)
    x = torch.cat([b["x"] for b in batches])
    H = x.T @ x / x.shape[0]
    W = base.layers[0].weight.detach().clone()
    errs = {}
    for sweeps in (0, 2):
        model = Chain(width=64, depth=1).eval()
        model.load_state_dict(base.state_dict())
        cal = Calibrator(["layers.0"], batches, config=CalibrationConfig(e_sweeps=sweeps))
        compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": False}), calibration=cal)
        errs[sweeps] = output_error(W, quantized_of(model.layers[0], "weight").dequantize(), H)
    assert errs[2] < 0.9 * errs[0], errs


def test_feedback_start_runs_through_the_front_door_and_is_refused_where_it_does_nothing():
    torch.manual_seed(0)
    base = Chain(width=64, depth=1).eval()
    batches = correlated_batches(width=64, rows=256)
    x = torch.cat([b["x"] for b in batches])
    H = x.T @ x / x.shape[0]
    W = base.layers[0].weight.detach().clone()
    errs = {}
    for e_init, sweeps in (("nearest", 0), ("feedback", 1)):
        model = Chain(width=64, depth=1).eval()
        model.load_state_dict(base.state_dict())
        cal = Calibrator(["layers.0"], batches, config=CalibrationConfig(e_sweeps=sweeps, e_init=e_init, local_rounds=0))
        compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": False}), calibration=cal)
        errs[e_init] = output_error(W, quantized_of(model.layers[0], "weight").dequantize(), H)
    assert errs["feedback"] < 0.9 * errs["nearest"], errs
    model = Chain(width=64, depth=1).eval()
    cal = Calibrator(["layers.0"], batches, config=CalibrationConfig(e_init="feedback"))
    with pytest.raises(CompressKitError, match="e_init would do nothing: they tune codebook quantizers, and 'gptq' is not one"):
        compresskit.compress(model, CompressConfig(method="gptq", bits=2), calibration=cal)
    # a family's recipe (Adapter.calibration_preset) serves every method: its e_init does not refuse gptq
    family = replace(CalibrationConfig(e_init="feedback"), from_family=frozenset({"e_init"}))
    report = compresskit.compress(model, CompressConfig(method="gptq", bits=2), calibration=Calibrator(["layers.0"], batches, config=family))
    assert [layer.name for layer in report.layers] == ["layers.0"]


def test_em_round_with_task_loss_reduces_the_loss():
    torch.manual_seed(0)
    base = Chain(width=64, depth=2).eval()
    batches = correlated_batches(width=64, rows=128)
    x = torch.cat([b["x"] for b in batches])
    target = base(x).detach()

    def task_loss(model, batch):
        with torch.no_grad():
            y = base(batch["x"])
        return (model(batch["x"]) - y).pow(2).mean()

    losses = {}
    for rounds in (0, 1):
        model = Chain(width=64, depth=2).eval()
        model.load_state_dict(base.state_dict())
        cfg = CalibrationConfig(m_objective="task" if rounds else None, em_rounds=rounds, m_steps=30 if rounds else 0, lr=3e-3 if rounds else 1e-4)
        cal = Calibrator(["layers.0", "layers.1"], batches, task_loss, cfg)
        compresskit.compress(model, CompressConfig(method="pq", bits=2), calibration=cal)
        with torch.no_grad():
            losses[rounds] = float((model(x) - target).pow(2).mean())
    assert losses[1] < losses[0], losses


def test_task_m_step_trains_on_its_own_batches_and_the_walk_on_the_calibration_ones():
    torch.manual_seed(0)
    model = Chain(width=32, depth=2).eval()
    walk, train = correlated_batches(n=2, seed=0), correlated_batches(n=3, seed=1)
    seen = []

    def task_loss(m, batch):
        seen.append(batch["x"])
        return m(batch["x"]).pow(2).mean()

    cal = Calibrator(["layers.0", "layers.1"], walk, task_loss, CalibrationConfig(m_objective="task", em_rounds=1, m_steps=5), m_batches=train)
    cal.model_objective.calibration_loss = lambda m: None  # the guard's passes read the walk batches; count the M-step only
    compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"k": 16}), calibration=cal)
    assert len(seen) == 5
    assert [next(i for i, b in enumerate(train) if b["x"] is x) for x in seen] == [0, 1, 2, 0, 1]
    # without m_batches, the calibration batches
    assert Calibrator(["layers.0"], walk, task_loss).m_batches == walk


def test_distill_m_step_matches_the_uncompressed_model_recorded_before_the_walk():
    """m_objective="distill": the teacher targets are the uncompressed model's outputs, taken before
    any layer is compressed, and the M-step lowers the distance to them."""
    torch.manual_seed(0)
    base = Chain(width=64, depth=2).eval()
    batches = correlated_batches(width=64, rows=128)
    x = torch.cat([b["x"] for b in batches])
    target = base(x).detach()

    def targets_fn(model, batch):
        return model(batch["x"]).detach()

    def loss_fn(model, batch, teacher):
        return (model(batch["x"]) - teacher).pow(2).mean()

    errors = {}
    for rounds in (0, 1):
        model = Chain(width=64, depth=2).eval()
        model.load_state_dict(base.state_dict())
        cfg = CalibrationConfig(em_rounds=rounds, m_steps=30, lr=3e-3, m_objective="distill") if rounds else CalibrationConfig()
        cal = Calibrator(["layers.0", "layers.1"], batches, config=cfg, distill=(targets_fn, loss_fn))
        compresskit.compress(model, CompressConfig(method="pq", bits=2), calibration=cal)
        if rounds:
            assert torch.equal(torch.cat([cal.m_teacher[j] for j in range(len(batches))]), target)
        with torch.no_grad():
            errors[rounds] = float((model(x) - target).pow(2).mean())
    assert errors[1] < errors[0], errors
    with pytest.raises(CompressKitError, match="distill"):
        Calibrator(["layers.0"], batches, config=CalibrationConfig(m_objective="distill"))


class Residual(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 256), nn.Linear(256, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Residual() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_block_m_step_hard_and_soft_assignments_lower_the_block_error():
    """Teacher-student M-step (and VQ4DiT's soft assignments) on noise inputs, as zero-data does."""
    torch.manual_seed(0)
    base = Stack().eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(64, 64, generator=g)} for _ in range(4)]  # Gaussian noise: zero data
    x = torch.cat([b["x"] for b in batches])
    ref = base(x).detach()
    errors, codes = {}, {}
    for steps, soft in ((0, 0), (100, 0), (100, 4)):
        model = Stack().eval()
        model.load_state_dict(base.state_dict())
        cfg = CalibrationConfig(m_steps=steps, m_objective="block", lr=1e-3, soft_candidates=soft, e_sweeps=0) if steps else CalibrationConfig(e_sweeps=0)
        cal = Calibrator(["blocks.0", "blocks.1"], batches, config=cfg)
        compresskit.compress(model, CompressConfig(method="pq", bits=2), calibration=cal)
        with torch.no_grad():
            errors[(steps, soft)] = float((model(x) - ref).pow(2).mean())
        codes[(steps, soft)] = quantized_of(model.blocks[0].fc1, "weight").codes.clone()
    assert errors[(100, 0)] < 0.9 * errors[(0, 0)], errors
    assert errors[(100, 4)] < 0.9 * errors[(0, 0)], errors
    assert not torch.equal(codes[(100, 4)], codes[(0, 0)])  # soft assignments moved some codes


def test_em_round_never_makes_a_layer_worse_on_its_calibration_statistics():
    """Few passes make the usage count flag live centroids as dead; the round must not pay for that."""
    torch.manual_seed(0)
    model = Chain(width=64, depth=2).eval()
    batches = correlated_batches(width=64, rows=128)
    cal = Calibrator(["layers.0", "layers.1"], batches, config=CalibrationConfig())
    compresskit.compress(model, CompressConfig(method="pq", bits=2), calibration=cal)
    cal.model_objective.config = CalibrationConfig(em_rounds=1, tau_dead=10_000)  # every centroid counts as dead
    torch.manual_seed(0)
    fresh = Chain(width=64, depth=2).eval()
    x = torch.cat([b["x"] for b in batches])
    with torch.no_grad():
        inputs = {"layers.0": x, "layers.1": torch.relu(fresh.layers[0](x)) * 1.5}
    for name in ("layers.0", "layers.1"):
        cal.originals[name] = fresh.get_submodule(name).weight.detach().clone()
        cal.hessians[name] = inputs[name].T @ inputs[name] / x.shape[0]
    before = {n: output_error(cal.originals[n], quantized_of(model.get_submodule(n), "weight").dequantize(), cal.hessians[n]) for n in cal.originals}
    cal.em_round(model)
    after = {n: output_error(cal.originals[n], quantized_of(model.get_submodule(n), "weight").dequantize(), cal.hessians[n]) for n in cal.originals}
    assert all(after[n] <= before[n] * (1 + 1e-6) for n in before), (before, after)



def test_em_round_never_ends_above_its_own_m_step_on_the_calibration_loss():
    """Re-assignment serves each layer's output error; the round keeps it only if the task loss agrees."""
    import copy

    torch.manual_seed(0)
    base = Chain(width=64, depth=2).eval()
    batches = correlated_batches(width=64, rows=128)

    def task_loss(model, batch):
        with torch.no_grad():
            y = base(batch["x"])
        return (model(batch["x"]) - y).pow(2).mean()

    for pool in (True, False):
        model = Chain(width=64, depth=2).eval()
        model.load_state_dict(base.state_dict())
        cal = Calibrator(["layers.0", "layers.1"], batches, task_loss, CalibrationConfig(m_objective="task", em_rounds=1, m_steps=30, lr=3e-3))
        cal.em_round = lambda model, **_: None  # the walk only (keeping Hessians); the round by hand below
        compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": pool}), calibration=cal)
        m_only = copy.deepcopy(model)
        Calibrator.em_round(cal, model)
        cal.model_objective.optimise(m_only, lambda step: task_loss(m_only, batches[step % len(batches)]))
        assert cal.model_objective.calibration_loss(model) <= cal.model_objective.calibration_loss(m_only) * (1 + 1e-6)


def test_m_step_learning_rate_is_in_weight_units_for_row_scaled_centroids():
    import compresskit
    from compresskit import CompressConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.mul_(0.05)
    compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": False, "k": 16, "row_scale": True}, include=["0"]))
    compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"pool": False, "k": 16}, include=["1"]))
    mults = {id(p): m for p, m in trainable_tensors(model)}
    scaled, plain = quantized_of(model[0], "weight"), quantized_of(model[1], "weight")
    unit = float(scaled.state_tensors()["scale_"].float().mean())
    assert unit < 0.2  # the rows were scaled down: centroids are in units of that scale
    assert mults[id(scaled.state_tensors()["codebooks_"])] == pytest.approx(1 / unit)
    assert mults[id(scaled.state_tensors()["scale_"])] == 1.0
    assert mults[id(plain.state_tensors()["codebooks_"])] == 1.0


def test_loss_keys_reach_the_task_loss_and_never_the_model():
    """A batch may carry what only the loss needs (a diffusion batch's noise): the walk leaves it out."""
    torch.manual_seed(0)
    model = Chain(width=16, depth=2).eval()
    batches = [{"x": torch.randn(8, 16), "target": torch.randn(8, 16)} for _ in range(2)]
    seen = []

    def task_loss(m, batch):
        seen.append(sorted(batch))
        return (m(batch["x"]) - batch["target"]).pow(2).mean()

    config = CalibrationConfig(m_objective="task", em_rounds=1, m_steps=2)
    cal = Calibrator(["layers.0", "layers.1"], batches, task_loss, config, loss_keys=("target",))
    compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"k": 16}), calibration=cal)  # Chain(x) takes no target
    assert seen and all(keys == ["target", "x"] for keys in seen)


def test_m_dense_trains_the_matching_uncompressed_parameters_too():
    """m_dense="*.bias": the task M-step moves the biases (a dense tensor beside each compressed
    weight) as well as the codebooks, and lowers the loss more than the codebooks alone; a pattern
    that matches nothing is one clear error."""
    torch.manual_seed(0)
    base = Chain(width=32, depth=2).eval()
    batches = correlated_batches(n=4)
    x = torch.cat([b["x"] for b in batches])
    target = base(x).detach() + 0.3  # an output shift that biases fix at once

    def task_loss(m, batch):
        return (m(batch["x"]) - (base(batch["x"]).detach() + 0.3)).pow(2).mean()

    losses, biases = {}, {}
    for dense in ("", "*.bias"):
        model = Chain(width=32, depth=2).eval()
        model.load_state_dict(base.state_dict())
        cfg = CalibrationConfig(m_objective="task", em_rounds=1, m_steps=40, lr=1e-2, m_dense=dense)
        compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"k": 16}), calibration=Calibrator(["layers.0", "layers.1"], batches, task_loss, cfg))
        with torch.no_grad():
            losses[dense] = float((model(x) - target).pow(2).mean())
        biases[dense] = model.layers[1].bias.detach().clone()
    moved = {dense: float((b - base.layers[1].bias.detach()).abs().max()) for dense, b in biases.items()}
    assert moved[""] < 1e-3 < 1e-2 < moved["*.bias"], moved  # without m_dense only float16 storage rounds them
    assert losses["*.bias"] < 0.9 * losses[""], losses
    with pytest.raises(CompressKitError, match="m_dense pattern 'layers.*.gain' matches no uncompressed parameter"):
        model = Chain(width=32, depth=2).eval()
        cfg = CalibrationConfig(m_objective="task", em_rounds=1, m_steps=2, m_dense="*.bias, layers.*.gain")
        compresskit.compress(model, CompressConfig(method="pq", bits=2, params={"k": 16}), calibration=Calibrator(["layers.0", "layers.1"], batches, task_loss, cfg))


def test_m_dense_is_refused_where_it_would_do_nothing():
    with pytest.raises(CompressKitError, match="m_dense would do nothing"):
        CalibrationConfig(m_dense="*.bias").validated()
    with pytest.raises(CompressKitError, match="m_dense would do nothing: the block M-step trains codebooks only"):
        CalibrationConfig(m_objective="block", m_steps=2, m_dense="*.bias").validated()
    with pytest.raises(CompressKitError, match="m_dense must be comma-separated"):
        CalibrationConfig(m_objective="task", em_rounds=1, m_steps=2, m_dense=3).validated()
