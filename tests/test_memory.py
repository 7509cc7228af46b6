import torch
from torch import nn

from actcompile.passes.capture import capture_graphs
from actcompile.passes.memory import profile_memory
from actcompile.plan import TensorKind


def profile(model, x, **kw):
    (graph,) = capture_graphs(model, x)
    return profile_memory(graph, **kw)


def test_storage_saved_twice_counts_once_and_lists_both_uses():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    p = profile(model, torch.randn(32, 64))
    (relu_out,) = [t for t in p.tensors if t.is_activation]
    assert relu_out.nbytes == 32 * 128 * 4
    assert relu_out.ops == ("ReluBackward0", "AddmmBackward0")
    assert p.output_bytes == 32 * 4 * 4          # the caller holds the output: it counts, fixed
    assert p.baseline_bytes == relu_out.nbytes + p.output_bytes


def test_parameters_buffers_and_inputs_are_marked_not_counted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(6, 6))
    x = torch.randn(2, 3, 8, 8)
    p = profile(model, x)
    kinds = {t.kind for t in p.tensors}
    assert {TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.INPUT, TensorKind.ACTIVATION} <= kinds
    assert p.baseline_bytes == sum(t.nbytes for t in p.tensors if t.kind is TensorKind.ACTIVATION) + p.output_bytes
    weight = next(t for t in p.tensors if t.shape == (6, 6) or t.shape == (6, 6)[::-1])
    assert weight.kind is TensorKind.PARAMETER   # nn.Linear saves its weight: filtered


def test_views_of_one_storage_count_once():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x):
            a, b = self.lin(x).chunk(2, dim=1)
            return (a * b).sum()          # mul saves both halves: two views of one storage

    p = profile(Split(), torch.randn(16, 256))
    (h,) = [t for t in p.tensors if t.is_activation]
    assert h.nbytes == 16 * 256 * 4 and h.ops == ("MulBackward0", "MulBackward0")
    assert h.packed_shape == (16 * 256,)   # a partial view first: the codec gets the whole storage
    assert p.baseline_bytes == 16 * 256 * 4 + 4   # and the scalar it returns


def test_saves_released_during_forward_are_not_counted():
    class Detour(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            unused = torch.tanh(self.lin(x)) * 3     # saved, but nothing the output needs
            del unused
            return self.lin(x).sum()

    p = profile(Detour(), torch.randn(64, 32))
    assert all("Tanh" not in op for t in p.tensors for op in t.ops)


def test_fake_profile_equals_real_profile():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(4, 3, 16, 16)
    model(x)   # materialize the lazy layer
    (graph,) = capture_graphs(model, x)
    fake, real = profile_memory(graph, mode="fake"), profile_memory(graph, mode="real")
    assert fake.mode == "fake" and real.mode == "real"
    assert [(t.node, t.ordinal, t.shape, t.nbytes, t.kind) for t in fake.tensors] == \
           [(t.node, t.ordinal, t.shape, t.nbytes, t.kind) for t in real.tensors]


def test_unknown_meta_workspace_falls_back_to_real():
    from actcompile.zoo import build

    model, x = build("lstm")
    p = profile(model, x)
    assert p.mode == "real"
    assert max(t.nbytes for t in p.tensors if t.dtype == "uint8") > 0


def test_bytes_by_node_attributes_each_storage_to_its_first_saver():
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 4))
    p = profile(model, torch.randn(16, 64))
    by_node = p.bytes_by_node()
    assert by_node == {"input_2": 16 * 128 * 4, "input_4": 16 * 32 * 4}   # tanh and ReLU outputs, saved by themselves
    assert sum(by_node.values()) == p.baseline_bytes - p.output_bytes
    assert p.output_bytes == 16 * 4 * 4


class Features(nn.Module):
    """Returns its features with the logits (distillation, probing): the head saves them too."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.GELU())
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


def test_a_saved_tensor_the_forward_returns_is_an_output_counted_once_and_never_a_candidate():
    from actcompile import explain
    from actcompile.plan import SkipReason

    p = profile(Features(), torch.randn(32, 64))
    (features,) = [t for t in p.tensors if t.kind is TensorKind.OUTPUT]
    assert features.shape == (32, 128) and features.ops == ("AddmmBackward0",)
    assert p.output_bytes == 32 * 4 * 4   # the logits: returned, read by no backward
    assert p.baseline_bytes == features.nbytes + p.output_bytes + sum(t.nbytes for t in p.tensors if t.is_activation)
    plan = explain(Features(), torch.randn(256, 64), budget=0.6)
    assert not any(a.node == features.node for a in plan.assignments)
    assert any(s.reason is SkipReason.OUTPUT for s in plan.sections[0].plan.skipped)
