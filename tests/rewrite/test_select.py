"""Layer selection: include / exclude / keep-dense patterns, overrides, ties, typos, CLI parsing."""
import re

import pytest

from compresskit.errors import CompressKitError
from compresskit.rewrite import parse_override, select_targets
from compresskit.targets import Target


def _layer(name, order, tied_to=(), aliases=()):
    return Target(name, name, "weight", "linear", (4, 4), order=order, tied_to=tied_to, aliases=aliases)


NAMES = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
LAYERS = [_layer(name, i) for i, name in enumerate(NAMES)] + [_layer("lm_head", len(NAMES))]


def test_everything_is_selected_by_default_in_order():
    selection = select_targets(LAYERS)
    assert list(selection.compress) == NAMES + ["lm_head"]
    assert selection.dense == {} and all(params == {} for params in selection.compress.values())


def test_exclude_wins_over_include():
    selection = select_targets(LAYERS, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert list(selection.compress) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert selection.dense["model.layers.0.mlp.down_proj"] == "excluded by '*.down_proj'"
    assert selection.dense["lm_head"] == "not matched by any include pattern"


def test_keep_dense_defaults_are_not_checked_for_typos():
    selection = select_targets(LAYERS, keep_dense=["lm_head", "*.embed_tokens"])
    assert "lm_head" not in selection.compress
    assert selection.dense["lm_head"] == "kept dense by default ('lm_head')"


def test_last_matching_override_wins_whole():
    overrides = [("*", {"method": "pq", "bits": 3, "subspaces": 8}), ("*.mlp.*", {"method": "rtn", "bits": 4}),
                 ("model.layers.1.mlp.up_proj", {"method": "rtn", "bits": 2})]
    compress = select_targets(LAYERS, overrides=overrides).compress
    assert compress["model.layers.0.self_attn.q_proj"] == {"method": "pq", "bits": 3, "subspaces": 8}
    assert compress["model.layers.0.mlp.up_proj"] == {"method": "rtn", "bits": 4}
    assert compress["model.layers.1.mlp.up_proj"] == {"method": "rtn", "bits": 2}


def test_override_dicts_are_copied():
    params = {"method": "rtn", "bits": 4}
    selection = select_targets(LAYERS, overrides=[("lm_head", params)])
    selection.compress["lm_head"]["bits"] = 1
    assert params["bits"] == 4


@pytest.mark.parametrize("kwargs", [{"include": ["*.mpl.*"]}, {"exclude": ["lm_haed"]},
                                    {"overrides": [("layers.0.*", {"method": "rtn"})]}])
def test_a_pattern_matching_nothing_is_an_error(kwargs):
    typo = (kwargs.get("include") or kwargs.get("exclude") or [kwargs["overrides"][0][0]])[0]
    with pytest.raises(CompressKitError, match=re.escape(f"{typo!r} match no compressible layer")):
        select_targets(LAYERS, **kwargs)


def test_patterns_match_aliases():
    layers = [_layer("encoder.fc", 0, aliases=("decoder.fc",))]
    assert list(select_targets(layers, include=["decoder.*"]).compress) == ["encoder.fc"]


def test_tied_layer_stays_dense_unless_its_partner_is_compressed():
    tied_to_missing = [_layer("fc", 0), _layer("lm_head", 1, tied_to=("model.embed_tokens",))]
    dense = select_targets(tied_to_missing).dense
    assert dense == {"lm_head": "weight tied to 'model.embed_tokens', which stays dense"}

    both = [_layer("model.embed_tokens", 0, tied_to=("lm_head",)), _layer("lm_head", 1, tied_to=("model.embed_tokens",))]
    assert list(select_targets(both).compress) == ["model.embed_tokens", "lm_head"]
    dense = select_targets(both, exclude=["model.embed_tokens"]).dense
    assert dense["lm_head"] == "weight tied to 'model.embed_tokens', which stays dense"


@pytest.mark.parametrize("text, expected", [
    ("*.mlp.*=rtn:4", ("*.mlp.*", {"method": "rtn", "bits": 4})),
    ("model.layers.0.*=pq:3", ("model.layers.0.*", {"method": "pq", "bits": 3})),
    (" lm_head = vq ", ("lm_head", {"method": "vq"})),
    ("gaussians.f_rest=pq:1,d=45,k=256,pool=false", ("gaussians.f_rest", {"method": "pq", "bits": 1, "d": 45, "k": 256, "pool": False})),
    ("*.attn.* = rtn:4, group_size = 64", ("*.attn.*", {"method": "rtn", "bits": 4, "group_size": 64})),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["*.mlp.*", "=rtn:4", "*.mlp.*=", "*=rtn:four", "*=rtn:4:2", "*=4"])
def test_parse_override_rejects_malformed_input(text):
    with pytest.raises(CompressKitError, match="PATTERN=METHOD"):
        parse_override(text)


@pytest.mark.parametrize("text", ["*=pq:2,d", "*=pq:2,=4", "*=pq:2,d=", "*=pq:2,bits=3", "*=pq:2,method=rtn"])
def test_parse_override_rejects_malformed_parameters(text):
    with pytest.raises(CompressKitError, match="cannot parse parameter"):
        parse_override(text)


def test_an_override_parameter_the_method_does_not_take_is_refused():
    from compresskit import CompressConfig

    with pytest.raises(CompressKitError, match="pq: unknown parameter"):
        CompressConfig(method="pq", bits=2, overrides=(parse_override("*=pq:1,width=45"),)).validated()


def test_parse_override_rejects_bits_out_of_range():
    with pytest.raises(CompressKitError, match="between 1 and 16"):
        parse_override("*=rtn:0")
