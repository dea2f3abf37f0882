"""Layer discovery: the three paths, execution order, shared / tied / dead layers, replacement."""
import time

import pytest
import torch
from torch import nn

from compresskit.errors import CompressKitError
from compresskit.rewrite import find_targets


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 8, 3)
        self.conv2d = nn.Conv2d(8, 8, 1)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, ids):
        x = self.emb(ids).transpose(1, 2)  # [batch, 4, seq]
        x = self.conv1d(x).unsqueeze(-1)  # [batch, 8, seq - 2, 1]
        x = self.conv2d(x).mean(dim=(2, 3))  # [batch, 8]
        return self.head(x)


class Reordered(nn.Module):
    """Declares its layers in the reverse of the order forward calls them; ``mid`` runs twice."""

    def __init__(self):
        super().__init__()
        self.last = nn.Linear(4, 2)
        self.mid = nn.Linear(4, 4)
        self.first = nn.Linear(4, 4)
        self.dead = nn.Linear(4, 4)

    def forward(self, x):
        return self.last(self.mid(self.mid(self.first(x))))


class DataDependent(nn.Module):
    """Control flow on the input's *values*: both symbolic_trace and export reject it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class ShapeBranch(nn.Module):
    """Control flow on the input's *shape*: symbolic_trace rejects it, export specialises it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            x = self.b(x)
        return self.a(x)


def test_symbolic_trace_finds_linear_and_conv_layers():
    graph = find_targets(ConvNet())
    assert graph.method == "symbolic_trace" and graph.fallback_reason is None
    assert graph.names == ["conv1d", "conv2d", "head.0", "head.2"]
    assert [layer.kind for layer in graph] == ["conv1d", "conv2d", "linear", "linear"]
    assert graph.targets[1].weight_shape == (8, 8, 1, 1)
    assert all(layer.in_graph for layer in graph)


def test_embeddings_only_by_option():
    graph = find_targets(ConvNet(), include_embeddings=True)
    assert graph.names[0] == "emb" and graph.targets[0].kind == "embedding"


def test_order_is_execution_order_with_repeated_and_dead_layers():
    graph = find_targets(Reordered())
    assert graph.names == ["first", "mid", "last", "dead"]
    assert [layer.order for layer in graph] == [0, 1, 2, 3]
    assert [layer.in_graph for layer in graph] == [True, True, True, False]


def test_export_path_orders_layers_when_symbolic_trace_fails():
    graph = find_targets(ShapeBranch(), torch.ones(2, 4))  # a lone tensor is one argument
    assert graph.method == "export"
    assert graph.fallback_reason.startswith("symbolic_trace failed")
    assert graph.names == ["b", "a", "unused"]
    assert [layer.in_graph for layer in graph] == [True, True, False]


def test_module_tree_fallback_when_both_tracers_fail():
    graph = find_targets(DataDependent(), (torch.ones(2, 4),))
    assert graph.method == "module_tree"
    assert "symbolic_trace failed" in graph.fallback_reason
    assert "torch.export failed" in graph.fallback_reason
    assert graph.names == ["a", "b"] and not any(layer.in_graph for layer in graph)


def test_module_tree_without_inputs_or_by_choice():
    no_inputs = find_targets(DataDependent())
    assert no_inputs.method == "module_tree" and "no example inputs" in no_inputs.fallback_reason
    by_choice = find_targets(Reordered(), use_graph=False)
    assert by_choice.method == "module_tree" and by_choice.fallback_reason == "use_graph=False"
    assert by_choice.names == ["last", "mid", "first", "dead"]


def test_shared_module_reported_once_with_its_alias():
    model = Reordered()
    model.again = model.first  # the same module object under a second name
    graph = find_targets(model)
    assert graph.names.count("first") == 1 and "again" not in graph.names
    assert graph.targets[0].aliases == ("again",)


class WithAttention(nn.Module):
    """nn.MultiheadAttention uses out_proj's weight without calling out_proj."""

    def __init__(self, branch_on_shape: bool):
        super().__init__()
        self.branch_on_shape = branch_on_shape  # True: symbolic_trace fails, export is used
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if self.branch_on_shape and x.shape[0] > 1:
            x = x * 2
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.parametrize("branch_on_shape, method", [(False, "symbolic_trace"), (True, "export")])
def test_multihead_attention_out_proj_is_found(branch_on_shape, method):
    graph = find_targets(WithAttention(branch_on_shape), (torch.ones(3, 1, 8),))
    assert graph.method == method
    assert graph.names == ["attn.out_proj", "fc"] and all(layer.in_graph for layer in graph)


def test_find_targets_rejects_a_non_module():
    with pytest.raises(CompressKitError, match="torch.nn.Module"):
        find_targets("model")


# --- a real transformers LLaMA through torch.export -------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_export_on_tiny_llama(tiny_llama):
    ids = torch.randint(0, 256, (1, 8))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    start = time.perf_counter()
    graph = find_targets(tiny_llama, (ids,), {"use_cache": False})
    elapsed_s = time.perf_counter() - start
    assert graph.method == "export", graph.fallback_reason
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in per_block] + ["lm_head"]
    assert graph.names == expected
    assert all(layer.in_graph for layer in graph)
    lm_head = graph.targets[-1]
    assert lm_head.tied_to == ("model.embed_tokens",) and lm_head.weight_shape == (256, 64)
    # the model is left as it was
    assert not tiny_llama.training and tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert elapsed_s < 30


def test_export_failure_on_llama_is_recorded(tiny_llama):
    # Without use_cache=False the forward returns a DynamicCache, which export cannot flatten.
    graph = find_targets(tiny_llama, (torch.randint(0, 256, (1, 8)),), include_embeddings=True)
    if graph.method == "export":
        pytest.skip("this transformers version exports its cache object")
    assert graph.method == "module_tree" and "torch.export failed" in graph.fallback_reason
    assert graph.names[0] == "model.embed_tokens"
    assert graph.targets[0].tied_to == ("lm_head",)
