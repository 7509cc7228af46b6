"""The Dynamo front end: what it captures, what each graph input is, and the errors it gives."""

import pytest
import torch
from torch import nn

from actcompile import meta
from actcompile.errors import InputMismatchError, TraceError
from actcompile.passes.capture import capture_graphs, dynamo_forward
from actcompile.plan import TensorKind
from actcompile.zoo import TRACE_SUITE, build


@pytest.mark.parametrize("name", TRACE_SUITE)
def test_every_reference_model_captures_with_fake_values(name):
    """Every node whose real output is a tensor carries a FakeTensor of that shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensor

    model, x = build(name)
    graphs = capture_graphs(model, x)
    assert graphs
    for graph in graphs:
        real = {}

        class Record(torch.fx.Interpreter):
            def run_node(self, n):
                real[n.name] = super().run_node(n)
                return real[n.name]

        with torch.no_grad():
            Record(graph.gm).run(*graph.flat_inputs)
        tensor_nodes = [n for n in graph.gm.graph.nodes
                        if n.op != "placeholder" and isinstance(real.get(n.name), torch.Tensor)]
        assert tensor_nodes, f"{name}: graph {graph.name} computes nothing"
        for n in tensor_nodes:
            val = meta.get_val(n)
            assert isinstance(val, FakeTensor), f"{name}: {n.format_node()} has no FakeTensor"
            assert val.shape == real[n.name].shape and val.dtype == real[n.name].dtype, n.format_node()


def test_parameters_are_the_models_own_and_marked():
    model, x = build("gpt2")
    graphs = capture_graphs(model, x)
    params = {id(p) for p in model.parameters()}
    marked = [t for g in graphs for t, kind in zip(g.flat_inputs, g.input_kinds) if kind is TensorKind.PARAMETER]
    assert marked and all(id(t) in params for t in marked)
    assert {id(t) for t in marked} == params   # every parameter reaches a graph as itself, nothing copied


def test_input_kinds_of_buffers_inputs_and_held_attributes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8)
            self.scale = torch.full((8,), 2.0)     # a plain attribute: held by the module, not a buffer

        def forward(self, x):
            return torch.tanh(self.bn(x) * self.scale)

    (graph,) = capture_graphs(Net(), torch.randn(4, 8))
    kinds = {k for k in graph.input_kinds if k is not None}
    assert {TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.INPUT, TensorKind.HELD} <= kinds


def test_data_dependent_branch_is_a_graph_break_not_a_specialization():
    model, _ = build("branchy")
    bright, dark = torch.ones(2, 3, 16, 16), -torch.ones(2, 3, 16, 16)
    graphs = capture_graphs(model, bright)
    assert len(graphs) >= 2, "the branch on x.mean() must split the forward"
    forward = dynamo_forward(model)
    torch.manual_seed(0)
    expected = model(dark)
    torch.manual_seed(0)
    assert torch.equal(forward(dark), expected)


def test_capture_leaves_no_trace_on_buffers_or_rng():
    model, x = build("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    capture_graphs(model, x)
    after_capture = torch.randn(4)
    torch.manual_seed(3)
    assert torch.equal(after_capture, torch.randn(4)), "capture consumed global random numbers"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "capture changed buffers"


def test_a_model_dynamo_cannot_capture_raises_trace_error():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        @torch._dynamo.disable
        def forward(self, x):
            return self.lin(x)

    with pytest.raises(TraceError, match="Dynamo captured no graph of Opaque.forward"):
        capture_graphs(Opaque(), torch.randn(2, 4))


def test_a_forward_that_modifies_its_input_in_place_is_refused():
    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            x.mul_(2)
            return self.lin(x)

    with pytest.raises(TraceError, match="modifies its input tensors in place"):
        capture_graphs(Mutates(), torch.randn(2, 4))


def test_inputs_that_do_not_match_the_forward_signature():
    model = nn.Linear(4, 4)
    with pytest.raises(InputMismatchError, match="forward"):
        capture_graphs(model, (torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(InputMismatchError, match="missing a required argument: 'input'"):
        capture_graphs(model, {"x": torch.randn(2, 4)})
    with pytest.raises(InputMismatchError, match=r"Linear cannot run on the example inputs \(shapes \[\(2, 5\)\]\)"):
        capture_graphs(model, torch.randn(2, 5))
    with pytest.raises(InputMismatchError, match="accepted are a Tensor"):
        capture_graphs(model, 3.0)


def test_keyword_inputs():
    model, x = build("bert")
    graphs = capture_graphs(model, {"input_ids": x})
    assert TensorKind.INPUT in graphs[0].input_kinds


def test_many_models_of_one_class_each_get_their_own_graphs():
    """Dynamo caches per code object; a fresh top frame per model keeps the ninth model captured."""
    for width in range(4, 16):
        graphs = capture_graphs(nn.Sequential(nn.Linear(width, 8), nn.ReLU()), torch.randn(2, width))
        assert len(graphs) == 1


class _VmapInForward(nn.Module):
    """A ``torch.vmap`` in the forward (HF Mamba's CPU scan does this): Dynamo traces it into the
    graph, whose nodes inside it return batched tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 512), nn.Linear(512, 10)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        h = torch.vmap(lambda row: row * torch.sigmoid(row).sum())(h)
        return self.b(h)


def test_a_forward_calling_vmap_plans_around_it_and_trains_as_without():
    """Planning crashed ("Cannot access storage of BatchedTensorImpl", reported as an input
    mismatch). Saves inside the vmap are counted and never packed (autograd's hooks get them
    batched), nothing inside it is recomputed, and the budget error says what they hold."""
    import copy

    import actcompile
    from actcompile.plan import SkipReason

    torch.manual_seed(0)
    model, x = _VmapInForward(), torch.randn(128, 256)
    plan = actcompile.explain(model, x, budget=0.7)
    vmapped = [s for s in plan.sections[0].plan.skipped if s.reason is SkipReason.VMAPPED]
    assert vmapped and plan.planned_bytes <= plan.budget_bytes
    assert {a.node for a in plan.assignments}.isdisjoint({s.node for s in vmapped})
    plain = copy.deepcopy(model)
    plain(x).square().sum().backward()
    compiled = actcompile.actcompile(model, budget=0.7, example_inputs=x)
    compiled(x).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.9999
    with pytest.raises(actcompile.BudgetError, match="inside torch.vmap"):
        actcompile.explain(model, x, budget=0.25)
