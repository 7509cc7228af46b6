"""Gradient shares from one probe backward, and plans weighed by them."""

import math

import pytest
import torch
import torch.nn as nn

import actcompile
from actcompile.passes.capture import capture_graphs
from actcompile.passes.memory import profile_memory
from actcompile.passes.sensitivity import gradient_shares
from actcompile.plan import Plan


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


def model_probe(model, x, seed=0):
    """{name: gradient} of the probe gradient_shares runs, through the model itself (same seed, same tangent)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model(x)
        tangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))   # as the probe draws it
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(out, list(model.parameters()), tangent)))


def probe_gradients(model, x, seed=0):
    """The squared norms of :func:`model_probe`'s gradients, by parameter name."""
    return {n: float(g.double().pow(2).sum()) for n, g in model_probe(model, x, seed).items()}


def saved_by(profile, op):
    return [t for t in profile.tensors if t.is_activation and any(u.op == op for u in t.uses)]


def test_a_conv_input_reaches_its_own_weight_and_an_elementwise_input_everything_upstream():
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 16, 16)
    (graph,) = capture_graphs(model, x)
    shares = gradient_shares(graph)
    norms = probe_gradients(model, x)
    total = sum(norms.values())
    profile = profile_memory(graph)
    # conv2 reads tanh(conv1(x)); that tensor is also read by TanhBackward (its error reaches
    # the gradient tanh passes to conv1): conv2.weight and everything of conv1
    (h1,) = [t for t in saved_by(profile, "ConvolutionBackward0") if t.shape == (4, 8, 16, 16)
             and any(u.op == "TanhBackward0" for u in t.uses)]
    expected = (norms["conv2.weight"] + norms["conv1.weight"] + norms["conv1.bias"]) / total
    assert shares[(h1.node, h1.ordinal)] == pytest.approx(expected, rel=1e-6)
    # the mean's input, read by nothing but the mean's backward (which saves no tensor): no share;
    # the head's input (the mean) reaches head.weight only, through AddmmBackward's mat1
    (pooled,) = [t for t in saved_by(profile, "AddmmBackward0") if t.shape == (4, 8)]
    assert shares[(pooled.node, pooled.ordinal)] == pytest.approx(norms["head.weight"] / total, rel=1e-6)


class ChainNet(nn.Module):
    """conv1's output is read only by conv2's backward (for conv2's weight gradient)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv2(self.conv1(x))).mean(dim=(2, 3)))


def test_what_only_a_frozen_layers_gradient_reads_has_no_share_and_gets_the_smallest_codec():
    torch.manual_seed(0)
    model, x = ChainNet(), torch.randn(8, 3, 32, 32)
    (graph,) = capture_graphs(model, x)
    profile = profile_memory(graph)
    (h,) = [t for t in saved_by(profile, "ConvolutionBackward0") if t.shape == (8, 16, 32, 32)]
    key = (h.node, h.ordinal)
    norms = probe_gradients(model, x)
    assert gradient_shares(graph)[key] == pytest.approx(norms["conv2.weight"] / sum(norms.values()), rel=1e-6)
    model.conv2.weight.requires_grad_(False)
    (graph,) = capture_graphs(model, x)
    assert gradient_shares(graph)[key] == 0.0
    trained = [p for p in model.parameters() if p.requires_grad]
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(model(x).sum(), trained)])
    errors = {}
    for weighting in ("tensor", "gradient"):
        wrapped = actcompile.actcompile(model, budget=0.2, example_inputs=x, codecs=["int8", "int4", "int2"],
                                        error_weighting=weighting, gradient_floor=0.0, recompute=False)
        chosen = {a.node: a.codec for a in wrapped.plan.assignments}
        got = torch.cat([g.flatten() for g in torch.autograd.grad(wrapped(x).sum(), trained)])
        errors[weighting] = float((got - ref).norm() / ref.norm())
    assert chosen.get(h.node) == "int2", wrapped.plan   # its error reaches no gradient
    assert errors["gradient"] < errors["tensor"] / 10, errors   # measured: 1.6e-5 against 5.1e-4


def test_gradient_weighted_plan_predicts_its_gradient_error_and_roundtrips():
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    # codecs alone: a recomputed segment would take the tensor whose error this compares
    wrapped = actcompile.actcompile(model, budget=0.25, example_inputs=x, error_weighting="gradient", recompute=False)
    plan = wrapped.plan
    lossy = [a for a in plan.assignments if a.error > 0]
    assert lossy and all(a.gradient_share is not None and 0 <= a.gradient_share <= 1 for a in lossy)
    predicted = plan.predicted_gradient_error
    assert predicted == pytest.approx(math.sqrt(sum(a.gradient_share * a.error ** 2 for a in lossy)))
    assert f"predicted gradient error {predicted:.3g}" in str(plan)
    section = plan.sections[0].plan
    assert Plan.from_json(section.to_json()) == section
    # measured against the uncompressed gradient, same random-tangent loss: same order as predicted
    with torch.random.fork_rng():
        torch.manual_seed(1)
        tangent = torch.randn(8, 5)
    ref = torch.autograd.grad((model(x) * tangent).sum(), list(model.parameters()))
    got = torch.autograd.grad((wrapped(x) * tangent).sum(), list(model.parameters()))
    a, b = torch.cat([g.flatten() for g in ref]), torch.cat([g.flatten() for g in got])
    measured = float((a - b).norm() / a.norm())
    assert predicted / 10 < measured < predicted * 10, (measured, predicted)


def test_unknown_error_weighting_is_named_with_what_is_accepted():
    with pytest.raises(ValueError, match="'tensor', 'bytes', 'gradient'"):
        actcompile.actcompile(nn.Linear(4, 4), budget=0.5, error_weighting="hessian")


def test_the_gradient_floor_keeps_an_unreached_tensor_from_being_free():
    """A share of 0 at planning (a zero-initialised head) must not make a tensor's error free."""
    from actcompile.config import CompileConfig, parse_budget
    from actcompile.passes.policy import _weight
    from actcompile.plan import SavedTensor, TensorKind, Use

    t = SavedTensor(0, "h", 0, (4,), "float32", 16, TensorKind.ACTIVATION, (Use("TanhBackward0"),), (4,))
    shares = {("h", 0): 0.0, ("g", 0): 1.0}
    floored = CompileConfig(budget=parse_budget(0.5), error_weighting="gradient")
    assert _weight(t, floored, shares) == pytest.approx(0.25)
    bare = CompileConfig(budget=parse_budget(0.5), error_weighting="gradient", gradient_floor=0.0)
    assert _weight(t, bare, shares) == 0.0
    with pytest.raises(ValueError, match="gradient_floor=2.*must be in \\[0, 1\\]"):
        CompileConfig(budget=parse_budget(0.5), gradient_floor=2)


def measured_gradient_error(model, wrapped, x, outputs=5, seed=1):
    """Relative error of all parameter gradients through ``wrapped`` against ``model``, random-tangent loss."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tangent = torch.randn(x.shape[0], outputs)
    ref = torch.autograd.grad((model(x) * tangent).sum(), list(model.parameters()))
    got = torch.autograd.grad((wrapped(x) * tangent).sum(), list(model.parameters()))
    a, b = torch.cat([g.flatten() for g in ref]), torch.cat([g.flatten() for g in got])
    return float((a - b).norm() / a.norm())


def test_tolerance_plans_the_least_memory_whose_predicted_gradient_error_stays_under_it():
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    planned, measured = [], []
    for tolerance in (0.3, 0.03, 0.003):
        wrapped = actcompile.actcompile(model, tolerance=tolerance, example_inputs=x)
        plan = wrapped.plan
        assert plan.predicted_gradient_error is not None and plan.predicted_gradient_error <= tolerance
        assert plan.planned_bytes <= plan.budget_bytes < plan.baseline_bytes + 64 * 1024
        assert f"tolerance={tolerance:g}" in repr(wrapped)
        wrapped(x).sum().backward()   # trains: the packed bytes are what was planned
        stats = wrapped.last_stats
        assert stats.raw_bytes_replaced - stats.packed_bytes == plan.baseline_bytes - plan.planned_bytes
        planned.append(plan.planned_bytes)
        measured.append(measured_gradient_error(model, wrapped, x))
    # a looser tolerance never costs more memory, and the loosest compresses (the tightest: nearly lossless)
    assert planned[0] <= planned[1] <= planned[2]
    assert planned[0] < 0.5 * planned[2]
    assert measured[2] < 0.003 * 3 and measured[0] > measured[2]


def test_tolerance_and_budget_are_exclusive_and_checked():
    model, x = ConvNet(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="exactly one of budget= .* and tolerance="):
        actcompile.actcompile(model, budget=0.5, tolerance=0.01)
    with pytest.raises(TypeError, match="exactly one of budget="):
        actcompile.actcompile(model)
    with pytest.raises(ValueError, match="tolerance=1.5: must be a number in \\(0, 1\\)"):
        actcompile.actcompile(model, tolerance=1.5)
    with pytest.raises(TypeError, match="exactly one of budget="):
        actcompile.backend(budget=0.5, tolerance=0.01)


def test_tolerance_under_compile_plans_each_graph_within_it():
    """The Inductor back end weighs each saved value by the gradient share its backward graph
    gives it (one probe through the partitioned graphs) and plans the least memory whose
    predicted gradient error stays under the tolerance."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    planned, measured = [], []
    for tolerance in (0.3, 0.003):
        torch._dynamo.reset()
        be = actcompile.backend(tolerance=tolerance)
        compiled = torch.compile(model, backend=be)
        compiled(x).sum().backward()
        (plan,) = be.plans
        assert plan.predicted_gradient_error is not None and plan.predicted_gradient_error <= tolerance, plan
        assert plan.planned_bytes <= plan.budget_bytes
        planned.append(plan.planned_bytes)
        measured.append(measured_gradient_error(model, compiled, x))
    torch._dynamo.reset()
    assert planned[0] < 0.5 * planned[1], planned   # the loose tolerance compresses, the tight one little
    assert measured[1] < 0.003 * 3 and measured[0] > measured[1], measured


def _claiming_codec(name: str, keeps_values: bool, values_per_byte: int = 1):
    """A codec outside the default set whose calibration (``estimate``) claims no error at a byte
    per ``values_per_byte`` values; it keeps the values (``keeps_values``) or unpacks zeros."""
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Claiming:
        epsilon: float | None = None
        fixed_rate: ClassVar[bool] = True
        copies: ClassVar[float] = 1.0

        def supports(self, spec):
            return spec.dtype.is_floating_point

        def packed_nbytes(self, spec):
            return spec.numel // values_per_byte

        def estimate(self, x):
            return 0.0, x.numel() // values_per_byte

        def pack(self, x):
            return (x.clone() if keeps_values else torch.zeros_like(x),)

        def unpack(self, packed):
            return packed[0]

    Claiming.name = name
    return Claiming


@pytest.mark.parametrize("keeps_values", [False, True])
def test_a_plan_with_codecs_outside_the_default_set_is_kept_only_if_it_measures_better(monkeypatch, keeps_values):
    """Calibration can only predict a transform's effect on the gradient; where a plan takes a
    codec outside the default set, planning measures it against the default set's plan (one
    probe backward each) and keeps the one that moves the gradient less."""
    import actcompile.codecs as registry

    name = "test_keeps" if keeps_values else "test_zeros"
    codec_class = _claiming_codec(name, keeps_values)
    monkeypatch.setitem(registry._REGISTRY, name, codec_class)
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    plan = actcompile.explain(model, x, budget=0.5, recompute=False, codecs=["int8", name])
    chosen = {a.codec for a in plan.assignments}
    if keeps_values:   # exact at fewer bytes: kept, and measured exact
        assert name in chosen and plan.measured_gradient_error == 0.0
    else:              # zeros: the int8 plan moves the gradient far less
        assert name not in chosen and chosen == {"int8"}
        assert 0.0 < plan.measured_gradient_error < 0.05
    assert plan.planned_bytes <= plan.budget_bytes
    default_only = actcompile.explain(model, x, budget=0.5, recompute=False, codecs=["int8"])
    assert default_only.measured_gradient_error is None   # nothing outside the default set: no probe


def test_a_plan_only_such_a_codec_fits_is_measured_and_a_large_gradient_error_warned(monkeypatch):
    """Where only codecs outside the default set reach the budget there is no plan to compare
    with: the plan is still measured, and a gradient it changes beyond GRADIENT_ERROR_WARNING is
    warned of (wide_resnet50_2 at 1/16, batch 2, took a DCT plan with gradient cosine 0.05 in silence)."""
    import actcompile.codecs as registry
    from actcompile import GradientErrorWarning

    codec_class = _claiming_codec("test_zeros_small", keeps_values=False, values_per_byte=16)
    monkeypatch.setitem(registry._REGISTRY, "test_zeros_small", codec_class)
    monkeypatch.setattr(actcompile.api, "GRADIENT_ERROR_WARNING", 0.1)   # zeros for one saved tensor: ~0.3 here
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    with pytest.raises(actcompile.BudgetError):
        actcompile.explain(model, x, budget=0.2, recompute=False, codecs=["int8"])
    with pytest.warns(GradientErrorWarning, match="changes the parameter gradient by"):
        plan = actcompile.explain(model, x, budget=0.2, recompute=False, codecs=["int8", "test_zeros_small"])
    assert "test_zeros_small" in {a.codec for a in plan.assignments}
    assert plan.measured_gradient_error > actcompile.api.GRADIENT_ERROR_WARNING, plan.measured_gradient_error


def test_a_plan_as_lossy_as_int2_is_measured_as_the_runtime_runs_it():
    """A plan giving a tensor a codec as lossy as RISKY_ERROR is measured by one step as the
    runtime runs it (run_gradients: its codecs and its recomputed runs); an int8 plan is not."""
    from actcompile.measure import compare_gradients, forward_backward
    from actcompile.passes.sensitivity import gradient_error, probe_gradients, run_gradients
    from actcompile.passes.emit import emit_regions

    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    (graph,) = capture_graphs(model, x)
    exact = probe_gradients(graph)
    plain = run_gradients(graph, graph.gm)
    assert gradient_error([(exact, plain)]) < 1e-6, "the runtime's step on the plain graph is the exact probe"
    coarse = actcompile.explain(model, x, budget=0.12, recompute=False, codecs=["int2"])
    assert max(a.error for a in coarse.assignments) >= actcompile.api.RISKY_ERROR
    section = coarse.sections[0].plan
    assert coarse.measured_gradient_error == pytest.approx(
        gradient_error([(exact, run_gradients(graph, emit_regions(graph.gm, section)))]), rel=1e-6)
    compiled = actcompile.actcompile(model, budget=0.12, recompute=False, codecs=["int2"], example_inputs=x)
    _, relative = compare_gradients(forward_backward(model, x)[1], forward_backward(compiled, x)[1])
    assert 0.3 < coarse.measured_gradient_error / relative < 3, (coarse.measured_gradient_error, relative)
    assert actcompile.explain(model, x, budget=0.5, recompute=False, codecs=["int8"]).measured_gradient_error is None


def test_a_tight_plan_is_measured_whatever_its_codecs(monkeypatch):
    """A plan keeping at most TIGHT_FRACTION of the baseline with any lossy codec is measured
    too (inception_v3 at 1/8, batch 2, int4/int8 boundaries under recomputed BatchNorms: cosine
    0.84, no codec as lossy as int2); a looser one with the same codec is not."""
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(8, 3, 32, 32)
    loose = actcompile.explain(model, x, budget=0.5, recompute=False, codecs=["int8"])
    assert loose.measured_gradient_error is None
    monkeypatch.setattr(actcompile.api, "TIGHT_FRACTION", 0.5)   # int8's 1/4 of a tensor is "tight" now
    tight = actcompile.explain(model, x, budget=0.5, recompute=False, codecs=["int8"])
    assert tight.planned_bytes <= 0.5 * tight.baseline_bytes
    assert tight.measured_gradient_error is not None and 0 < tight.measured_gradient_error < 0.05


def test_probe_gradients_are_the_parameter_gradients_and_see_each_substituted_save():
    from actcompile.codecs import get_codec
    from actcompile.passes.sensitivity import gradient_error, probe_gradients

    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 16, 16)
    (graph,) = capture_graphs(model, x)
    exact = probe_gradients(graph)
    expected = model_probe(model, x)
    assert {id(p) for p in model.parameters()} == set(exact)
    for name, p in model.named_parameters():
        assert torch.allclose(exact[id(p)], expected[name], atol=1e-6)
    assert gradient_error([(exact, probe_gradients(graph))]) == 0.0   # the same seed: the same probe
    profile = profile_memory(graph)
    keys = [(t.node, t.ordinal) for t in profile.tensors if t.is_activation]
    errors = [gradient_error([(exact, probe_gradients(graph, {k: get_codec(c) for k in keys}))])
              for c in ("int8", "int4", "int2")]
    assert 0.0 < errors[0] < errors[1] < errors[2], errors



def test_the_probe_and_the_runtimes_step_agree_on_a_model_with_dropout():
    """The probe's forward restores the global RNG after it runs, the runtime's leaves it past
    its dropout masks: tangents drawn from it differed, and a TransformerEncoder with dropout at
    1/8 was measured (and warned) at 1.41, uncorrelated gradients, where its step's error is 0.04."""
    import warnings

    from actcompile import GradientErrorWarning
    from actcompile.passes.sensitivity import gradient_error, probe_gradients, run_gradients

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(128, 4, 256, dropout=0.1, batch_first=True, norm_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    x = torch.randn(4, 32, 128)
    (graph,) = capture_graphs(model, x)
    exact = probe_gradients(graph)
    assert gradient_error([(exact, run_gradients(graph, graph.gm))]) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientErrorWarning)
        plan = actcompile.explain(model, x, budget=0.125)
    assert plan.measured_gradient_error is not None and plan.measured_gradient_error < 0.3


def test_a_plan_recomputing_from_lossy_boundaries_is_measured_and_never_silently_wrong():
    """HF ViTMAE at 1/4: the joint plan recomputed runs from int8 boundaries (every planned
    ε ≤ 0.01), neither tight nor int2, so it went unmeasured; through LayerNorm rows of near-zero
    variance (eps 1e-12) the error grew 10⁶-fold: gradient cosine 0.049, 3.7·10⁶× the norm, no
    warning. Such a plan is measured now, and where it measures over RETRY_ERROR the plan whose
    recomputed runs read nothing lossy is measured too; the better is kept, and warned if bad.
    Since recomputed runs are one autograd node each (cheaper), the default plan recomputes
    alone here and is exact; at checkpoint's old price per run it mixes int8 and recomputation,
    as before, and is measured."""
    import copy
    import warnings

    from actcompile import GradientErrorWarning
    from actcompile.measure import compare_gradients

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=256, decoder_hidden_size=64,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                                       decoder_intermediate_size=128)
    model = transformers.ViTMAEForPreTraining(config).train()
    x = dict(pixel_values=torch.randn(4, 3, 64, 64))

    def gradients(call, owner):
        torch.manual_seed(0)
        call(**x).loss.backward()
        return {n: p.grad for n, p in owner.named_parameters() if p.grad is not None}

    plain = copy.deepcopy(model)
    reference = gradients(plain, plain)
    for options in ({}, {"reserve_bytes_per_segment": 8192}):
        trained = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = actcompile.actcompile(trained, budget=0.25, example_inputs=x, **options)
        codecs = {a.codec for a in compiled.plan.assignments}
        if "recompute" in codecs and any(a.error > 0 for a in compiled.plan.assignments):
            assert compiled.plan.measured_gradient_error is not None, str(compiled.plan)
        cosine, relative = compare_gradients(reference, gradients(compiled, trained))
        warned = any(issubclass(w.category, GradientErrorWarning) for w in caught)
        assert relative < 10, f"{options}: gradient off by {relative:.3g}: the 10⁶-fold plan was kept"
        assert warned or cosine >= 0.95, f"{options}: cosine {cosine:.4f} with no GradientErrorWarning"
    assert "recompute" in codecs and "int8" in codecs, f"checkpoint's price no longer mixes the two: {codecs}"


class _GRULoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.out = nn.GRUCell(128, 512), nn.Linear(512, 32)

    def forward(self, x):
        h, outs = torch.zeros(x.shape[0], 512), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(torch.relu(self.out(h)))
        return torch.stack(outs, 1).sum(1)


def test_a_recurrence_that_compounds_codec_error_is_recomputed_instead():
    """A GRUCell loop at 1/8: the knapsack put int4/int8 on the hidden states (each ε ≤ 0.04),
    but sixteen steps compound it: measured relative gradient error 0.28, under the warning, and a
    survey's training step had cosine 0.958. Over RETRY_ERROR, the plan that recomputes wherever
    it fits is measured too (about 1e-7 here) and the better one kept."""
    import copy

    from actcompile.api import RETRY_ERROR
    from actcompile.measure import compare_gradients, forward_backward

    torch.manual_seed(0)
    model, x = _GRULoop(), torch.randn(64, 16, 128)
    reference = copy.deepcopy(model)
    # codecs priced as cheap as compiled kernels make them (the suite runs them eagerly)
    compiled = actcompile.actcompile(model, budget=0.125, example_inputs=x, bytes_per_second=1e11)
    assert compiled.plan.measured_gradient_error <= RETRY_ERROR, str(compiled.plan)
    cosine, relative = compare_gradients(forward_backward(reference, x)[1], forward_backward(compiled, x)[1])
    assert relative <= RETRY_ERROR, f"relative gradient error {relative:.3g} (cosine {cosine:.4f})"
