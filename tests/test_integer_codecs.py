"""Lossless narrowing of integer and bool saves: bit-for-bit round trips, sizes, and the plans that use them."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import actcompile
from actcompile.codecs import get_codec
from actcompile.codecs.base import TensorSpec, packed_bytes
from actcompile.codecs.integer import BitsCodec, NarrowCodec, PoolOffsetsCodec
from actcompile.config import CompileConfig, parse_budget
from actcompile.errors import PlanDriftWarning
from actcompile.passes.capture import capture_graphs
from actcompile.passes.memory import profile_memory
from actcompile.passes.policy import choose_plan
from actcompile.passes.rules import integer_codecs
from actcompile.plan import SavedTensor, TensorKind, Use
from actcompile.zoo import MNISTNet


def roundtrip(codec, x):
    packed = codec.pack(x)
    return codec.unpack(packed), packed


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 1000, 4099])
def test_bits_keep_every_bool_in_one_bit(numel):
    x = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    y, packed = roundtrip(BitsCodec(), x)
    assert y.dtype == torch.bool and torch.equal(y, x)
    assert packed_bytes(packed) == BitsCodec().packed_nbytes(TensorSpec.of(x)) == (numel + 7) // 8
    shaped = x[: numel - numel % 4].reshape(-1, 2, 2) if numel >= 4 else x
    assert torch.equal(roundtrip(BitsCodec(), shaped)[0], shaped)


def pool_indices_and_codec(pool, x):
    """Real indices of ``pool(x)`` and the codec the rules derive from the backward reading them."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return pool(x * self.scale)

    (graph,) = capture_graphs(Net(), x)
    profile = profile_memory(graph, mode="real")
    (saved,) = [t for t in profile.tensors if t.dtype == "int64"]
    config = CompileConfig(budget=parse_budget(1.0))
    codec = integer_codecs(saved, config)[0]
    _, indices = pool(x.detach())
    return indices, codec


GEOMETRIES = {
    "2x2": lambda x: F.max_pool2d(x, 2, return_indices=True),
    "3x3 s2 p1 (ResNet stem)": lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True),
    "ceil mode": lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True),
    "2x3 s(1,2) dilation 2": lambda x: F.max_pool2d(x, (2, 3), (1, 2), dilation=2, return_indices=True),
    "unbatched": lambda x: F.max_pool2d(x[0], 2, return_indices=True),
    "adaptive 13 -> 4x5": lambda x: F.adaptive_max_pool2d(x, (4, 5), return_indices=True),
    "3-D 2x2x2": lambda x: F.max_pool3d(x.reshape(2, 3, 13, 13, 1).expand(2, 3, 13, 13, 4), (2, 2, 2),
                                        return_indices=True),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_pool_offsets_restore_max_pool_indices_bit_for_bit(geometry):
    x = torch.randn(2, 3, 13, 13, generator=torch.Generator().manual_seed(1))
    indices, codec = pool_indices_and_codec(GEOMETRIES[geometry], x)
    assert isinstance(codec, PoolOffsetsCodec)
    y, packed = roundtrip(codec, indices)
    assert y.dtype == torch.int64 and torch.equal(y, indices)
    size = codec.packed_nbytes(TensorSpec.of(indices))
    assert packed_bytes(packed) == size
    assert size <= indices.numel() // 2 + 1   # at most 4 bits an index, against 64
    if geometry == "2x2":
        assert size == indices.numel() // 4    # 2 bits


def test_pool_offsets_with_the_wrong_geometry_is_measured_inexact_not_trusted():
    x = torch.randn(1, 1, 8, 8)
    _, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    wrong = PoolOffsetsCodec(input_size=(8, 8), kernel=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    assert not torch.equal(roundtrip(wrong, indices)[0], indices)


def test_narrow_keeps_values_and_warns_when_they_outgrow_the_dtype():
    x = torch.arange(-100, 100, dtype=torch.int64).reshape(4, 50)
    codec = NarrowCodec(dtype="int8")
    y, packed = roundtrip(codec, x)
    assert torch.equal(y, x) and y.dtype == torch.int64
    assert packed_bytes(packed) == codec.packed_nbytes(TensorSpec.of(x)) == 200
    grown = x * 10
    with pytest.warns(PlanDriftWarning, match="outside int8"):
        y, packed = roundtrip(codec, grown)
    assert torch.equal(y, grown)                      # never a wrong value
    assert [c.dtype for c in NarrowCodec.ladder(TensorSpec((4,), torch.int32))] == ["uint8", "int8", "int16"]
    with pytest.raises(ValueError, match="accepted: uint8, int8, int16, int32"):
        NarrowCodec(dtype="int4")


def test_a_measured_error_on_an_integer_tensor_excludes_the_codec():
    t = SavedTensor(0, "idx", 0, (65536,), "int64", 65536 * 8, TensorKind.ACTIVATION, (Use("GatherBackward0"),),
                    (65536,))
    from actcompile.plan import MemoryProfile

    profile = MemoryProfile(tensors=(t,), events=(), node_order=("idx",))
    config = CompileConfig(budget=parse_budget(0.5), codecs=(get_codec("int8"),), reserve_bytes_per_node=0,
                           reserve_bytes_per_packed=0)
    lossy = {("idx", 0): [(NarrowCodec(dtype="int16"), 1e-9, 65536 * 2)]}
    with pytest.raises(actcompile.BudgetError):
        choose_plan(profile, config, lossy)
    exact = {("idx", 0): [(NarrowCodec(dtype="int16"), 0.0, 65536 * 2)]}
    (a,) = choose_plan(profile, config, exact).assignments
    assert (a.codec, a.error) == ("narrow", 0.0)


def held_activation_bytes(model, x, compressed=None) -> int:
    """Activation bytes one forward leaves for backward: the distinct storages autograd holds
    (saved-tensor hooks; parameters and the input left out) plus what the plan's codecs hold."""
    storages = {}
    outside = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in outside:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):   # the plan's hooks see its saves first
        (compressed or model)(x)
    return sum(storages.values()) + (compressed.last_stats.packed_bytes if compressed is not None else 0)


def test_the_research_mnist_net_plans_at_a_quarter_with_its_indices_narrowed():
    torch.manual_seed(0)
    model, x = MNISTNet(), torch.randn(16, 1, 28, 28)
    baseline = held_activation_bytes(model, x)
    compiled = actcompile.actcompile(model, budget=0.25, recompute=False)   # the codecs, not a recomputation
    compiled(x)
    plan = compiled.plan
    # the int64 indices narrowed exactly: to 2-bit window offsets, or (cheaper to run, priced so,
    # and enough for 1/4 here) to int16
    pooled = [a for a in plan.assignments if a.codec in ("pool_offsets", "narrow")]
    assert len(pooled) == 1 and pooled[0].error == 0.0, plan
    assert pooled[0].bytes_after * (32 if pooled[0].codec == "pool_offsets" else 4) == pooled[0].bytes_before
    assert plan.planned_bytes <= plan.budget_bytes <= baseline / 4 + 1
    assert held_activation_bytes(model, x, compiled) <= plan.budget_bytes


def test_narrowing_alone_leaves_gradients_bit_identical():
    """A budget only the integer codecs can meet: the plan is exact, so is every gradient."""
    torch.manual_seed(0)

    class PoolNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            h, _ = F.max_pool2d(self.conv(x), 2, return_indices=True)
            keep = h > 0.1                                   # a bool saved by masked_fill's backward
            return h.masked_fill(keep, 0.0).sum(dim=(2, 3)) + h.tanh().mean(dim=(2, 3))

    model, x = PoolNet(), torch.randn(8, 3, 32, 32)
    model(x).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    baseline = held_activation_bytes(model, x)
    compiled = actcompile.actcompile(model, budget=0.75, codecs=["int8"], recompute=False)
    compiled(x)
    codecs = {a.codec for a in compiled.plan.assignments}
    assert "pool_offsets" in codecs and "bits" in codecs, compiled.plan
    compiled(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, reference[n]), n
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanDriftWarning)
        held = held_activation_bytes(model, x, compiled)
    assert held <= compiled.plan.budget_bytes < baseline
