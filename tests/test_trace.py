import pytest
import torch
from torch import nn

from actcompile import meta
from actcompile.errors import InputMismatchError, TraceError
from actcompile.passes.trace import CAPTURE, trace_module
from actcompile.zoo import TRACE_SUITE, BranchyNet, build

EXPECTED_CAPTURE = {"gpt2": "export", "bert": "export", "branchy": "opaque"}


@pytest.mark.parametrize("name", TRACE_SUITE)
def test_every_reference_model_traces_with_fake_values(name):
    """Every node whose real output is a tensor carries a FakeTensor of that shape in meta['val']."""
    from torch._subclasses.fake_tensor import FakeTensor

    from actcompile.passes.trace import flatten_inputs, normalize_inputs

    model, x = build(name)
    gm = trace_module(model, x)
    assert gm.meta[CAPTURE] == EXPECTED_CAPTURE.get(name, "symbolic_trace")
    real = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            real[n.name] = super().run_node(n)
            return real[n.name]

    args, kwargs = normalize_inputs(gm, x)
    with torch.no_grad():
        Record(gm).run(*flatten_inputs(gm, args, kwargs))
    tensor_nodes = [n for n in gm.graph.nodes if isinstance(real.get(n.name), torch.Tensor)]
    assert tensor_nodes
    for n in tensor_nodes:
        val = meta.get_val(n)
        assert isinstance(val, FakeTensor), f"{name}: {n.format_node()} has no FakeTensor"
        assert val.shape == real[n.name].shape and val.dtype == real[n.name].dtype, n.format_node()


def _first_tensor(out):
    from torch.utils._pytree import tree_leaves

    return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def test_graph_shares_the_original_parameters():
    model, x = build("gpt2")
    gm = trace_module(model, x)
    original = {id(p) for p in model.parameters()}
    assert {id(p) for p in gm.parameters()} <= original


def test_data_dependent_branch_is_not_specialized():
    model, _ = build("branchy")
    gm = trace_module(model, torch.ones(2, 3, 16, 16))          # takes the "bright" branch
    dark = -torch.ones(2, 3, 16, 16)                            # takes the other one
    torch.manual_seed(0)
    expected = model(dark)
    torch.manual_seed(0)
    assert torch.equal(gm(dark), expected)
    assert any(meta.is_opaque(n) for n in gm.graph.nodes)


class _Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:           # data-dependent: only this submodule becomes opaque
            return torch.relu(x)
        return torch.tanh(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.inner, self.out = nn.Linear(8, 8), _Inner(), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.inner(self.lin(x)))


def test_only_the_branching_submodule_becomes_opaque():
    gm = trace_module(_Outer(), torch.randn(4, 8))
    opaque = [n.target for n in gm.graph.nodes if meta.is_opaque(n)]
    assert opaque == ["inner"]
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["lin", "inner", "out"]


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, *xs, **extra):
        return self.lin(torch.from_numpy(xs[0].numpy()) if len(xs) > 0 and xs[0].sum() > 0 else xs[0])


def test_untraceable_model_raises_trace_error_naming_model_and_line():
    with pytest.raises(TraceError) as info:
        trace_module(_Untraceable(), torch.randn(2, 4))
    message = str(info.value)
    assert "_Untraceable" in message
    assert "test_trace.py" in message, message


def test_inputs_that_do_not_match_the_forward_signature():
    model = nn.Linear(4, 4)
    with pytest.raises(InputMismatchError, match="forward"):
        trace_module(model, (torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(InputMismatchError, match="missing a required argument: 'input'"):
        trace_module(model, {"x": torch.randn(2, 4)})
    with pytest.raises(InputMismatchError, match=r"Linear cannot run on the example inputs \(shapes \[\(2, 5\)\]\)"):
        trace_module(model, torch.randn(2, 5))
    with pytest.raises(InputMismatchError, match="accepted are a Tensor"):
        trace_module(model, 3.0)


def test_keyword_inputs():
    model, x = build("bert")
    gm = trace_module(model, {"input_ids": x})
    assert gm.meta[CAPTURE] == "export"
