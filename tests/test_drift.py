"""Plans stay true while training moves: drift checks measure each packed tensor's codec error
every ``check_every`` training forwards, warn, and re-plan when it left the plan."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actcompile import PlanDriftWarning, actcompile
from actcompile.measure import compare_gradients

WIDTH, BATCH = 128, 256


class ZeroGate(nn.Module):
    """``head(x + gate(x) * tanh(fc(x)))`` with the gate zero-initialised (adaLN-Zero, ReZero):
    at planning the gate's output is all zeros, which every codec keeps exactly."""

    def __init__(self):
        super().__init__()
        self.fc, self.gate, self.head = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 10)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x):
        return self.head(x + self.gate(x) * torch.tanh(self.fc(x)))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def gradients(model, x, labels):
    """The gradients the gate's saved output reaches: those of ``fc`` (behind the product)."""
    model.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("fc.")}


def train(wrapped, model, steps, lr=0.5):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, labels = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), labels).backward()
        optimizer.step()


def gate_codec(wrapped):
    """The codec the current plan gives the gate's output (saved by the product), if any."""
    return [a.codec for a in wrapped.plan.assignments if a.node == "mul" and a.ordinal == 1]


# The gate's output at planning is all zeros: what the plan gives it keeps them "exactly" and
# drifts once the gate moves. With the quantizers and mask it is the 1-bit mask; with the
# default set (DCT in it), DCT capped at the few bytes the zeros needed (the probe backward that
# checks a transform sees the zero gate too: no gradient flows past it yet).
GATE_PLANS = [pytest.param("quantizers", "mask", id="mask"),
              pytest.param(["dct", "int8", "int4"], "dct", id="dct"),
              pytest.param(None, "dct", id="default")]


@pytest.mark.parametrize("codecs, gate", GATE_PLANS)
def test_a_zero_initialised_gate_planned_as_exact_is_caught_and_replanned(codecs, gate):
    torch.manual_seed(0)
    model = ZeroGate()
    x, labels = batch(0)
    wrapped = actcompile(model, budget=0.35, example_inputs=x, check_every=2, compile_codecs=False,
                         recompute=False, codecs=codecs)   # the gate's codec is what drifts; recomputing would take it
    assert gate_codec(wrapped) == [gate], wrapped.plan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(wrapped, model, steps=4)
    drift = [w for w in caught if issubclass(w.category, PlanDriftWarning)]
    assert drift and f"mul[1] {gate}" in str(drift[0].message), [str(w.message) for w in caught]
    assert wrapped.drifts and wrapped.drifts[0].forward == 2 and wrapped.drifts[0].planned_error == 0.0
    assert wrapped.drifts[0].measured_error > 0.5, wrapped.drifts[0]
    # re-planned on the moved gate: the stale codec is gone and the gradients are right again
    assert gate_codec(wrapped) != [gate], wrapped.plan
    assert wrapped.plan.planned_bytes <= wrapped.plan.budget_bytes
    x, labels = batch(99)
    cosine, rel = compare_gradients(gradients(model, x, labels), gradients(wrapped, x, labels))
    assert rel < 0.02, f"fc's gradient after re-planning: rel err {rel:.3g} (cosine {cosine:.6f})"


@pytest.mark.parametrize("codecs, gate", GATE_PLANS)
def test_without_checks_the_drift_goes_unnoticed(codecs, gate):
    """The control: ``check_every=0`` measures nothing, and the stale codec ruins the gradients."""
    torch.manual_seed(0)
    model = ZeroGate()
    x, labels = batch(0)
    wrapped = actcompile(model, budget=0.35, example_inputs=x, check_every=0, compile_codecs=False,
                         recompute=False, codecs=codecs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanDriftWarning)
        train(wrapped, model, steps=4)
    assert not wrapped.drifts and wrapped.last_stats.packed_tensors > 0
    assert gate_codec(wrapped) == [gate]
    x, labels = batch(99)
    cosine, rel = compare_gradients(gradients(model, x, labels), gradients(wrapped, x, labels))
    assert rel > 0.5, f"fc's gradient: rel err {rel:.3g} (cosine {cosine:.6f}): the stale plan was expected to hurt"


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.relu(self.a(x)))))


def test_quantizers_on_new_batches_raise_no_false_alarm():
    """Every forward checked, batches and weights moving: int8/int4 errors stay within the tolerance."""
    torch.manual_seed(0)
    model = Mlp()
    x, _ = batch(0)
    wrapped = actcompile(model, budget=0.2, example_inputs=x, check_every=1, compile_codecs=False)
    codecs = {a.codec for a in wrapped.plan.assignments}
    assert codecs & {"int8", "int4", "int2", "fp8"}, wrapped.plan
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanDriftWarning)
        train(wrapped, model, steps=5, lr=0.1)
    assert not wrapped.drifts


@pytest.mark.parametrize("options, message", [
    ({"check_every": -1}, "check_every=-1"), ({"check_every": 2.5}, "check_every=2.5"),
    ({"drift_tolerance": 0.5}, "drift_tolerance=0.5"),
])
def test_bad_check_options_are_named(options, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        actcompile(Mlp(), budget=0.5, **options)


def test_a_plan_given_with_use_plan_is_kept_and_the_warning_says_so():
    """use_plan() is how every rank runs one plan: a drift warns, and the plan stays (a local
    re-plan would make the ranks differ)."""
    from actcompile import explain

    torch.manual_seed(0)
    model = ZeroGate()
    x, _ = batch(0)
    plan = explain(model, x, budget=0.3, recompute=False, codecs="quantizers")
    wrapped = actcompile(model, budget=0.3, check_every=2, compile_codecs=False, codecs="quantizers")
    wrapped.use_plan(plan, x)
    with pytest.warns(PlanDriftWarning, match="use_plan"):
        train(wrapped, model, steps=4)
    assert wrapped.drifts and gate_codec(wrapped) == ["mask"] and wrapped.plan.assignments == plan.assignments
    assert wrapped._drifted_keys(wrapped.drifts[0].graph) == {("mul", 1)}   # calibrated whole if re-planned


class _CheckpointedBlock(nn.Module):
    """A checkpointed block between two plain ones: at 1/8 the plan recomputes a run whose
    first node saves a value a codec packs, so both assignments carry that node's name."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(64, 256), nn.ReLU())
        self.blk = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.Sigmoid())
        self.frozen = nn.Sequential(nn.Linear(256, 256), nn.ReLU())
        self.post = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.blk, self.pre(x), use_reentrant=False)
        with torch.no_grad():
            f = self.frozen(h)
        return self.post(h * f + h)


def test_a_recomputed_run_is_not_checked_as_the_codec_on_its_first_nodes_save():
    """A recomputed run's assignment is named after its first node; when a codec packs that
    node's own save under the same name, the drift check used to compare the codec's error with
    the run's planned 0: a false drift and a re-plan on every step (measured: the heap kept
    1.9× the budget on the forwards after)."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    # the quantizers: with the transforms, the plan at 1/8 recomputes nothing here
    model = actcompile(_CheckpointedBlock(), budget=0.125, example_inputs=x, check_every=1, codecs="quantizers")
    names = [(a.node, a.ordinal, a.codec == "recompute") for a in model.plan.assignments]
    shared = {(n, o) for n, o, r in names if r} & {(n, o) for n, o, r in names if not r}
    assert shared, f"no recomputed run shares its name with a codec here, so this test shows nothing: {names}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanDriftWarning)
        for _ in range(4):
            model(x).sum().backward()
    assert not model.drifts
