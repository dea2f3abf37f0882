"""The front door (compress) and the file format (save / load) on small models."""
import json

import pytest
import torch
from torch import nn

import compresskit
from compresskit import CompressConfig
from compresskit.errors import CompressKitError
from compresskit.io import MANIFEST, TENSORS, load_into, read_manifest
from compresskit.nn import densify, is_quantized


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.emb = nn.Embedding(64, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight  # tied, as in many LMs

    def forward(self, ids, img):
        h = self.emb(ids).mean(1) + self.conv(img).mean((2, 3)).repeat(1, 2)
        return self.head(self.fc2(torch.relu(self.fc1(h))))


def make(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 5), generator=g), torch.randn(2, 4, 6, 6, generator=g)


def test_compress_replaces_selected_layers_and_reports_all_in_size():
    model = make()
    report = compresskit.compress(model, CompressConfig(method="rtn", bits=4), example_inputs=(inputs(), {}))
    assert report.graph_method == "symbolic_trace"
    assert is_quantized(model.fc1, "weight") and is_quantized(model.conv, "weight")
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.conv, nn.Conv2d)  # still what they were
    assert not is_quantized(model.head, "weight")  # tied to the embedding, which stays dense
    assert "head" in report.kept_dense
    total = report.total
    n_params = sum(p.numel() for p in make().parameters())  # tied weight counted once
    assert total.n_weights == n_params
    assert report.to_dict()["ratio"] > 1


def test_overrides_and_excludes():
    model = make()
    config = CompressConfig(method="pq", bits=2, exclude=("conv",), overrides=(("fc2", {"method": "rtn", "bits": 3}),))
    report = compresskit.compress(model, config, example_inputs=(inputs(), {}))
    methods = {layer.name: layer.method for layer in report.layers}
    assert methods == {"fc1": "pq", "fc2": "rtn"}
    assert not is_quantized(model.conv, "weight")


def test_typo_in_pattern_is_an_error():
    with pytest.raises(CompressKitError, match="fc9"):
        compresskit.compress(make(), CompressConfig(include=("fc9",)), example_inputs=(inputs(), {}))


def test_unknown_method_is_an_error_before_any_work():
    model = make()
    with pytest.raises(CompressKitError, match="unknown method"):
        compresskit.compress(model, CompressConfig(method="zip"))
    assert not is_quantized(model.fc1, "weight")


def test_save_load_round_trip_is_exact_and_pickle_free(tmp_path):
    model = make()
    config = CompressConfig(method="pq", bits=2, overrides=(("conv", {"method": "rtn", "bits": 3}),))
    report = compresskit.compress(model, config, example_inputs=(inputs(), {}))
    out = tmp_path / "m"
    compresskit.save(model, report, out, source={"model": "net"})
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, TENSORS]
    manifest = read_manifest(out)
    assert manifest["format_version"] == 3 and manifest["tensor_files"] == [TENSORS] and manifest["tied"] == {"head.weight": "emb.weight"}
    assert set(manifest["layers"]) == {"conv", "fc1", "fc2"}
    loaded = compresskit.load(out, model=make(seed=5))
    ids, img = inputs()
    torch.testing.assert_close(loaded(ids, img), model(ids, img), rtol=0, atol=0)
    # size on disk: the tensors file is the accounted size plus the safetensors header
    payload = (out / TENSORS).stat().st_size
    assert payload >= report.total.total_bytes
    assert payload - report.total.total_bytes < 16_384


def test_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    model = make()
    report = compresskit.compress(model, CompressConfig(method="rtn", bits=4), example_inputs=(inputs(), {}))
    out = tmp_path / "m"
    compresskit.save(model, report, out, source={"model": "net"})
    with pytest.raises(CompressKitError, match="already exists"):
        compresskit.save(model, report, out, source={"model": "net"})

    def boom(_dir):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        compresskit.save(model, report, tmp_path / "other", source={}, save_architecture=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial directory left


def test_load_rejects_damaged_or_foreign_directories(tmp_path):
    with pytest.raises(CompressKitError, match="not a compresskit model directory"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CompressKitError, match="format version 99"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CompressKitError, match="unreadable"):
        read_manifest(tmp_path)


def test_load_into_wrong_architecture_is_an_error(tmp_path):
    model = make()
    report = compresskit.compress(model, CompressConfig(method="rtn", bits=4), example_inputs=(inputs(), {}))
    compresskit.save(model, report, tmp_path / "m", source={})
    with pytest.raises(CompressKitError, match="does not exist in the model"):
        load_into(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m")


def test_densify_gives_plain_modules_with_the_same_function():
    model = make()
    compresskit.compress(model, CompressConfig(method="vq", bits=2, exclude=("conv",)), example_inputs=(inputs(), {}))
    ids, img = inputs()
    with torch.no_grad():
        ref = model(ids, img)
        densify(model)
    assert type(model.fc1) is nn.Linear
    torch.testing.assert_close(model(ids, img), ref)


def test_a_layer_too_small_for_the_method_gets_a_smaller_codebook_and_the_report_says_why():
    model = make()
    report = compresskit.compress(model, CompressConfig(method="vq", bits=2), example_inputs=(inputs(), {}))
    assert "conv" in report.notes and "k lowered" in report.notes["conv"]
    assert "conv" in report.to_dict()["notes"]
    assert {layer.name for layer in report.layers} >= {"conv", "fc1", "fc2"}


def test_an_explicit_override_too_big_for_its_layer_is_an_error():
    config = CompressConfig(method="rtn", bits=4, overrides=(("conv", {"method": "vq", "bits": 2}),))
    with pytest.raises(CompressKitError, match="layer 'conv'"):
        compresskit.compress(make(), config, example_inputs=(inputs(), {}))


class Scene(nn.Module):
    """A module whose compressible state is bare tensors, not layers (as a 3DGS scene's attributes)."""

    def __init__(self, n=512):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.colours = nn.Parameter(torch.randn(n, 12, generator=g))
        self.register_buffer("scales", torch.randn(n, 3, generator=g))
        self.mix = nn.Linear(15, 4)

    def forward(self, idx):
        return self.mix(torch.cat([self.colours[idx], self.scales[idx]], dim=-1))


class SceneAdapter(compresskit.adapters.Adapter):
    name = "scene-test"

    def load(self, spec):
        return compresskit.adapters.LoadedModel(Scene().eval(), "scene", "scene")

    def calibration_batches(self, loaded, data):
        return [{"idx": torch.arange(8)}]

    def evaluate(self, loaded, spec):
        return {}

    def extra_targets(self, model):
        from compresskit.targets import Layout

        return {"colours": Layout(inputs="none"), "scales": Layout(inputs="none")}


def test_bare_tensors_from_the_adapter_are_targets_and_round_trip(tmp_path):
    from compresskit.nn import quantized_tensors

    adapter = SceneAdapter()
    loaded = adapter.load(None)
    config = CompressConfig(method="pq", bits=2, params={"pool": False}, overrides=(("scales", {"method": "rtn", "bits": 4}),))
    report = compresskit.compress(loaded, config, adapter=adapter)
    assert set(quantized_tensors(loaded.model)) == {"mix", "colours", "scales"}
    assert {layer.name: layer.method for layer in report.layers} == {"mix": "pq", "colours": "pq", "scales": "rtn"}
    idx = torch.arange(20)
    with torch.no_grad():
        ref = loaded.model(idx)
    compresskit.save(loaded.model, report, tmp_path / "s", source={"model": "scene"})
    manifest = read_manifest(tmp_path / "s")
    assert manifest["layers"]["scales"]["owner"] == "" and manifest["layers"]["scales"]["attr"] == "scales"
    restored = compresskit.load(tmp_path / "s", model=Scene(n=512))
    with torch.no_grad():
        torch.testing.assert_close(restored(idx), ref, rtol=0, atol=0)


class WithTinyConditioning(nn.Module):
    """A diffusion U-Net's shape in miniature: convs, and a Linear(1, 128) conditioning input."""

    def __init__(self):
        super().__init__()
        self.cond = nn.Linear(1, 128)
        self.conv_in = nn.Conv2d(3, 128, 3, padding=1)
        self.conv_out = nn.Conv2d(128, 3, 3, padding=1)

    def forward(self, img, t):
        h = self.conv_in(img) + self.cond(t)[:, :, None, None]
        return self.conv_out(torch.relu(h))


@pytest.mark.parametrize("method", ["pq", "vq"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_one_odd_layer_never_fails_the_model(method, bits):
    torch.manual_seed(0)
    model = WithTinyConditioning().eval()
    report = compresskit.compress(model, CompressConfig(method=method, bits=bits))
    adapted_or_dense = {**report.notes, **report.kept_dense}
    assert "cond" in adapted_or_dense and adapted_or_dense["cond"]  # the report says what happened to it, and why
    assert is_quantized(model.conv_in, "weight") and is_quantized(model.conv_out, "weight")
    out = model(torch.randn(2, 3, 8, 8), torch.randn(2, 1))
    assert torch.isfinite(out).all()


class ColumnScene(nn.Module):
    """Per-item scalars ``[n]`` (a 3DGS scene's opacities) beside a table."""

    def __init__(self, n: int = 300):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.alpha = nn.Parameter(torch.randn(n, generator=g))

    def forward(self, idx):
        return self.alpha[idx]


class ColumnAdapter(SceneAdapter):
    name = "column-test"

    def load(self, spec):
        return compresskit.adapters.LoadedModel(ColumnScene().eval(), "column", "column")

    def extra_targets(self, model):
        from compresskit.targets import Layout

        return {"alpha": Layout(out_axis=1, inputs="none")}


def test_a_1d_tensor_with_out_axis_1_is_one_row_with_one_scale(tmp_path):
    adapter = ColumnAdapter()
    loaded = adapter.load(None)
    original = loaded.model.alpha.detach().clone()
    report = compresskit.compress(loaded, CompressConfig(method="rtn", bits=4), adapter=adapter)
    (layer,) = report.layers
    assert layer.shape == (1, 300)
    # one row: 4 bits per value plus one scale and zero for the whole column, not one pair per value
    assert layer.size.bits_per_weight < 4.2
    assert loaded.model.alpha.shape == (300,)
    step = (original.max() - original.min()) / 15
    assert (loaded.model.alpha - original).abs().max() <= step / 2 + 1e-3
    compresskit.save(loaded.model, report, tmp_path / "c", source={"model": "column"})
    restored = compresskit.load(tmp_path / "c", model=ColumnScene())
    torch.testing.assert_close(restored.alpha, loaded.model.alpha, rtol=0, atol=0)


def test_outputs_get_the_permissions_the_umask_gives_not_a_temporary_files(tmp_path):
    """Saved directories and PNGs are written to a temporary name first (mkdtemp / mkstemp would make
    them 0o700 / 0o600); what lands at the path must read as a plain mkdir / open would make it."""
    import os

    from PIL import Image

    from compresskit.grid import save_png

    model = make()
    report = compresskit.compress(model, CompressConfig(method="rtn", bits=4), example_inputs=(inputs(), {}))
    before = os.umask(0o027)
    try:
        compresskit.save(model, report, tmp_path / "m", source={"model": "net"})
        save_png(Image.new("L", (4, 4)), tmp_path / "grid.png")
    finally:
        os.umask(before)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "m" / TENSORS).stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "grid.png").stat().st_mode & 0o777 == 0o640


WIDTH_DEFAULTS = {"pq": {"pool": False}, "pq:1": {"d": 4, "k": 16}}


def fitted_layout(config: CompressConfig, override=None):
    q = config.layer_quantizer(override)
    return q.d, q.k, q.pool


def test_defaults_at_one_width_apply_at_that_width_only():
    assert fitted_layout(CompressConfig(method="pq", bits=1, method_defaults=WIDTH_DEFAULTS)) == (4, 16, False)
    assert fitted_layout(CompressConfig(method="pq", bits=2, method_defaults=WIDTH_DEFAULTS)) == (None, 256, False)
    # a layer overridden to 1 bit in a 2-bit model gets the 1-bit layout; one overridden to 2 bits in a 1-bit model does not
    two = CompressConfig(method="pq", bits=2, method_defaults=WIDTH_DEFAULTS)
    assert fitted_layout(two, {"method": "pq", "bits": 1}) == (4, 16, False)
    one = CompressConfig(method="pq", bits=1, method_defaults=WIDTH_DEFAULTS)
    assert fitted_layout(one, {"method": "pq", "bits": 2}) == (None, 256, False)


def test_a_width_default_is_one_layout_a_user_parameter_replaces_whole():
    # d=8 alone must not keep the default k=16 (half a bit per weight): the user's d brings PQ's own k back
    assert fitted_layout(CompressConfig(method="pq", bits=1, params={"d": 8}, method_defaults=WIDTH_DEFAULTS)) == (8, 256, False)
    assert fitted_layout(CompressConfig(method="pq", bits=1, method_defaults=WIDTH_DEFAULTS), {"method": "pq", "bits": 1, "k": 4}) == (None, 4, False)
    # parameters outside the layout leave it alone
    assert fitted_layout(CompressConfig(method="pq", bits=1, params={"pool": True}, method_defaults=WIDTH_DEFAULTS)) == (4, 16, True)


def test_an_adapters_width_layout_yields_to_the_callers_own_defaults():
    from compresskit.compress import _with_adapter_defaults

    class Family(SceneAdapter):
        method_defaults = {"pq": ({"pool": False}, "why"), "pq:1": ({"d": 4, "k": 16}, "why")}

    kept = _with_adapter_defaults(CompressConfig(method="pq", bits=1, method_defaults={"pq": {"pool": True}}), Family())
    assert fitted_layout(kept) == (4, 16, True)
    dropped = _with_adapter_defaults(CompressConfig(method="pq", bits=1, method_defaults={"pq": {"k": 64}}), Family())
    assert fitted_layout(dropped) == (None, 64, False)


def test_the_reported_parameters_are_the_ones_used(tmp_path):
    """compress on a real model with the width layout: every layer's fitted PQ has it, and the
    report's parameters say so."""
    model = make()
    report = compresskit.compress(model, CompressConfig(method="pq", bits=1, include=("fc*",), method_defaults=WIDTH_DEFAULTS))
    layers = {layer["name"]: layer for layer in report.to_dict()["layers"]}
    assert set(layers) == {"fc1", "fc2"}
    for layer in layers.values():
        assert (layer["params"]["d"], layer["params"]["k"], layer["size"]["parts_bits"]["codes"]) == (4, 16, 64 * 32)
