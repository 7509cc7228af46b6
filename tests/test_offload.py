"""Offload to host memory: a lossless round trip, priced by transfer time against the other choices,
offered only where the saves are on an accelerator.

The transfer streams run only on CUDA (checked on a lent GPU: ``benchmarks/offload.py``); here
the codec's CPU path, the plan's choice between offload, codecs and recomputation, and the
emitted module training with offloaded saves (on the CPU a clone, so only its gradients are
checked: it frees no memory there, and the planner never offers it there)."""

import dataclasses

import pytest
import torch

import actcompile
import actcompile.api
from actcompile.codecs import get_codec
from actcompile.codecs.base import TensorSpec, packed_bytes
from actcompile.codecs.offload import Offload
from actcompile.config import CompileConfig, default_codecs, parse_budget
from actcompile.passes.policy import choose_plan
from actcompile.plan import MemoryProfile, NodeRecord, SavedTensor, SaveEvent, TensorKind, Use


@pytest.mark.parametrize("x", [
    torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last),
    torch.randint(-2**40, 2**40, (1000,)),
    torch.rand(77) > 0.5,
    torch.randn(16, 16, dtype=torch.bfloat16),
], ids=["channels_last", "int64", "bool", "bf16"])
def test_offload_round_trips_bit_for_bit_and_holds_no_device_bytes(x):
    codec = Offload()
    payload = codec.pack(x)
    y = codec.unpack(payload)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert torch.equal(y, x)
    assert packed_bytes(payload) == codec.packed_nbytes(TensorSpec.of(x)) == 0


def _profile(count: int, nbytes: int = 2**20) -> MemoryProfile:
    tensors = tuple(SavedTensor(i, f"n{i}", 0, (nbytes // 4,), "float32", nbytes, TensorKind.ACTIVATION,
                                (Use("AddmmBackward0"),), (nbytes // 4,)) for i in range(count))
    events = tuple(SaveEvent(t.node, 0, t.ops[0], t.shape, t.dtype, t.index) for t in tensors)
    # each node writes its tensor: the forward's time, which prices time against error
    nodes = tuple(NodeRecord(t.node, "yes", (), ((t.index, nbytes),)) for t in tensors)
    return MemoryProfile(tensors=tensors, events=events, node_order=tuple(t.node for t in tensors), nodes=nodes)


@pytest.mark.parametrize("transfer_copies, expected", [(4.0, "offload"), (1e5, "int4")])
def test_the_plan_offloads_where_the_transfer_costs_less_than_the_codecs_error(transfer_copies, expected):
    """At 1/4 the choice is int4 (error 0.07, 2 copies of time) or offload (exact, priced as
    ``transfer_copies`` copies): a fast link takes offload, a slow one the codec."""
    profile = _profile(4)
    codecs = (get_codec("int4"), Offload())
    config = CompileConfig(budget=parse_budget(0.25), codecs=codecs, reserve_bytes_per_node=0,
                           reserve_bytes_per_packed=0, recompute=False, transfer_copies=transfer_copies)
    spec = TensorSpec((2**18,), torch.float32)
    calibration = {(t.node, 0): [(codecs[0], 0.07, codecs[0].packed_nbytes(spec)), (codecs[1], 0.0, 0)]
                   for t in profile.tensors}
    plan = choose_plan(profile, config, calibration)
    assert plan.planned_bytes <= plan.budget_bytes
    assert {a.codec for a in plan.assignments} == {expected}


def test_offload_is_offered_on_an_accelerator_only():
    assert "offload" not in {c.name for c in default_codecs(everything=True)}   # codecs="all" on a CPU too
    model, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="offload=True .* on the CPU"):
        actcompile.actcompile(model, budget=0.5, example_inputs=x, offload=True)
    with pytest.raises(ValueError, match="codecs=.*'offload'.* on the CPU"):
        actcompile.actcompile(model, budget=0.5, example_inputs=x, codecs=["int8", "offload"])
    with pytest.raises(ValueError, match="CompileConfig.offload='yes'"):
        actcompile.actcompile(model, budget=0.5, offload="yes")


def test_a_model_trains_with_its_saves_offloaded_as_without(monkeypatch):
    """The emitted module packs, offloads and restores every planned save (here a CPU clone: the
    planner is told the model is on an accelerator); gradients are bit-identical."""
    def as_if_on_an_accelerator(config, model, args=(), kwargs=None):
        return dataclasses.replace(config, codecs=(Offload(),), transfer_copies=2.0)

    monkeypatch.setattr(actcompile.api, "config_for_device", as_if_on_an_accelerator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GELU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Tanh(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 32 * 32, 10))
    x = torch.randn(8, 3, 32, 32)
    reference = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    compiled = actcompile.actcompile(model, budget=0.25, example_inputs=x, recompute=False, check_every=0)
    codecs = {a.codec for a in compiled.plan.assignments}
    assert codecs == {"offload"}
    assert compiled.plan.planned_bytes <= compiled.plan.budget_bytes
    got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
