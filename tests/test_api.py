"""The invariants of DESIGN.md, each on the rewritten module."""

import copy
import pickle

import pytest
import torch
from torch import nn

from actcompile import BudgetError, CodecError, ModelPlan, actcompile, explain
from actcompile import runtime
from actcompile.codecs import get_codec
from actcompile.zoo import build


def small_cnn():
    model, x = build("inplace_cnn")
    return model, x


def hooks_installed():
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def test_forward_bit_identical_with_dropout_and_same_rng_stream():
    model, x = small_cnn()
    compiled = actcompile(model, budget=0.25, example_inputs=x, recompute=False)   # packing is what this checks
    torch.manual_seed(7)
    a = model(x)
    after_a = torch.randn(3)
    torch.manual_seed(7)
    b = compiled(x)
    after_b = torch.randn(3)
    assert torch.equal(a, b)
    assert torch.equal(after_a, after_b), "compression consumed global random numbers"
    assert compiled.last_stats.packed_tensors > 0


def test_parameters_shared_and_state_dict_identical():
    model, x = small_cnn()
    compiled = actcompile(model, budget=0.25, example_inputs=x)
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    ours, theirs = compiled.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_optimizer_on_original_parameters_trains_the_result():
    model, x = small_cnn()
    reference = copy.deepcopy(model)
    compiled = actcompile(model, budget=0.25, example_inputs=x)
    target = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))

    def train(net, params):
        optimizer = torch.optim.SGD(params, lr=0.02)
        for step in range(4):
            optimizer.zero_grad()
            torch.manual_seed(step)
            nn.functional.cross_entropy(net(x), target).backward()
            optimizer.step()

    start = [p.detach().clone() for p in model.parameters()]
    train(reference, reference.parameters())
    train(compiled, model.parameters())        # the optimizer holds the original's parameters
    ours = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(model.parameters(), start)])
    theirs = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(reference.parameters(), start)])
    assert ours.norm() > 0, "the optimizer did not move the compiled module's parameters"
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item()
    assert cosine > 0.99, f"update direction cosine {cosine:.4f} vs uncompressed training"


def test_model_itself_is_not_modified():
    model, x = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    actcompile(model, budget=0.25, example_inputs=x)
    assert dict(model.named_modules()) == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "planning changed buffers"


class _Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.fail = False

    def forward(self, x):
        y = torch.relu(self.lin(x))
        return self.lin(torch.tanh(y)) if not self.fail else self.lin(y[:, :3])


def test_no_hooks_left_when_the_forward_raises():
    model = _Fails()
    x = torch.randn(256, 64)
    compiled = actcompile(model, budget=0.5, example_inputs=x)   # its output is 1/3 of the baseline
    assert compiled.plan.regions
    model.fail = True            # guarded by Dynamo: the next forward re-captures, and fails
    with pytest.raises(Exception):
        compiled(x)
    assert not hooks_installed()
    assert runtime._session() is None


def test_no_codec_work_in_eval_or_no_grad(monkeypatch):
    model, x = small_cnn()
    compiled = actcompile(model, budget=0.25, example_inputs=x, recompute=False)   # codecs to run
    calls = []
    monkeypatch.setattr(runtime._Session, "pack", lambda self, t: calls.append(1) or t)
    with torch.no_grad():
        compiled(x)
    compiled.eval()
    compiled(x)
    assert calls == []
    assert not model.training, "eval() must reach the wrapped model"
    compiled.train()
    compiled(x)
    assert calls, "training forward should pack"


class _SavedAsAView(nn.Module):
    """``h`` is saved by ``mul`` as it is and by ``F.linear`` as a 2-D view: one storage, two shapes."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(32, 64), nn.Linear(64, 64)
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        h = self.proj(x)
        return (h * self.scale + self.out(h)).sum(-1)


def test_only_the_nodes_the_plan_names_reach_the_pack_hook_and_a_view_save_reuses_the_packed_form():
    """The markers install the hooks around the planned nodes alone: saves elsewhere go straight
    to autograd (here: to the outer hooks), and a later save of a packed storage as a view of
    another shape is marked too (``viewed_by``), so it holds the packed form, never the storage."""
    torch.manual_seed(0)
    model, x = _SavedAsAView(), torch.randn(32, 64, 32)
    compiled = actcompile(model, budget=0.3, example_inputs=x, recompute=False, codecs=["int8"])
    (a,) = compiled.plan.assignments
    assert a.viewed_by and tuple(a.shape) == (32, 64, 64), compiled.plan
    h_bytes = 32 * 64 * 64 * 4
    outer = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: outer.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        out = compiled(x)
    assert compiled.last_stats.packed_tensors == 1 and compiled.last_stats.raw_bytes_replaced == h_bytes
    assert h_bytes not in outer, "a save of the packed storage kept it whole"
    assert 32 * 64 * 32 * 4 in outer, "the input's save (an unmarked node) reaches the outer hooks"
    out.sum().backward()
    assert model.scale.grad is not None and model.proj.weight.grad is not None


class _SharedTwice(nn.Module):
    """``h`` is made and packed before a graph break, then saved twice by the graph after it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 64)
        self.s1, self.s2, self.s3 = (nn.Parameter(torch.ones(64)) for _ in range(3))

    def forward(self, x):
        h = self.proj(x)
        a = h * self.s1
        torch._dynamo.graph_break()
        return (a + h * self.s2 + h * self.s3).sum()


def _saves_reaching(hook_bytes: int, call) -> int:
    """How many saves of a storage of ``hook_bytes`` bytes reach autograd whole (outer hooks)."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        call()
    return seen.count(hook_bytes)


def test_every_save_of_a_storage_an_earlier_graph_packed_holds_the_packed_form():
    """The graph after a break saves ``h`` twice; both saves are marked (``Skip.saved_by`` of its
    SHARED skip), so neither keeps the storage the first graph packed whole."""
    torch.manual_seed(0)
    model, x = _SharedTwice(), torch.randn(64, 64, 32)
    compiled = actcompile(model, budget=0.3, example_inputs=x, recompute=False, codecs=["int8"])
    shared = [s for s in compiled.plan.skipped if s.reason.name == "SHARED"]
    assert len(shared) == 1 and shared[0].saved_by, compiled.plan
    assert _saves_reaching(64 * 64 * 64 * 4, lambda: compiled(x)) == 0
    assert compiled.last_stats.raw_bytes_replaced == 64 * 64 * 64 * 4


def test_a_recomputed_run_reading_a_packed_storage_keeps_it_packed():
    """checkpoint saves a recomputed run's arguments through the saved-tensor hooks: the session's
    hooks are on around it, so an argument an earlier node packed stays packed."""
    table = {("sin", 0): runtime.Planned(get_codec("int8"), (256, 256), torch.float32)}
    x = torch.randn(256, 256, requires_grad=True)

    def forward():
        with runtime.compressing(table) as stats:
            h = x * 2
            runtime.begin_node("sin")
            y = h.sin()
            runtime.end_node()
            z = runtime.Recomputed(torch.cos)(h)
        assert stats.packed_tensors == 1
        forward.out = y.sum() + z.sum()

    assert _saves_reaching(256 * 256 * 4, forward) == 0
    forward.out.backward()
    want = 2 * (torch.cos(2 * x) - torch.sin(2 * x)).detach()
    assert ((x.grad - want).norm() / want.norm()).item() < 0.02   # both uses read h as int8 keeps it


class _SavedAsAnotherDtype(nn.Module):
    """``h`` is saved as it is by ``mul`` and, its bytes read as float16, by a second ``mul``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 64)
        self.s = nn.Parameter(torch.ones(64))
        self.w16 = nn.Parameter(torch.ones(128, dtype=torch.float16))

    def forward(self, x):
        h = self.proj(x)
        scaled = h * self.s
        bits = h.view(torch.float16) * self.w16
        return scaled.sum() + bits.float().nan_to_num().clamp(-1e3, 1e3).sum()


def test_a_save_reading_a_packed_storage_as_another_dtype_gets_its_exact_bytes():
    """A packed form decodes values, not bits: a save of the storage's bytes as another dtype is
    kept as it is (a guard failure), so its gradient is the uncompressed model's, bit for bit
    (the decoded float32 cut as float16 sizes used to raise in backward)."""
    torch.manual_seed(0)
    model, x = _SavedAsAnotherDtype(), torch.randn(64, 64, 32) * 0.01
    model(x).backward()
    reference = model.w16.grad.clone()
    model.zero_grad()
    compiled = actcompile(model, budget=0.6, example_inputs=x, recompute=False, codecs=["int8"])
    assert any(a.viewed_by for a in compiled.plan.assignments), compiled.plan
    with pytest.warns(RuntimeWarning, match="1 saved tensor.* differed from the plan"):
        compiled(x).backward()
    assert compiled.last_stats.guard_failures == 1
    assert torch.allclose(model.w16.grad, reference, rtol=0, atol=0, equal_nan=True)


def test_deepcopy_and_pickle_roundtrip():
    model, x = small_cnn()
    compiled = actcompile(model, budget=0.25, example_inputs=x)
    torch.manual_seed(0)
    expected = compiled(x)
    for clone in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        assert clone.plan == compiled.plan
        assert list(clone.state_dict()) == list(compiled.state_dict())
        torch.manual_seed(0)
        out = clone(x)
        assert torch.equal(out, expected)
        assert clone.last_stats.packed_tensors == compiled.last_stats.packed_tensors
        assert {id(p) for p in clone.parameters()}.isdisjoint({id(p) for p in model.parameters()})


def test_storage_saved_by_two_ops_is_packed_once():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 8))   # ReLU output: saved by ReLU and Linear
    x = torch.randn(512, 128)
    compiled = actcompile(model, budget=0.3, example_inputs=x, codecs=["int8", "int4"])
    (assignment,) = compiled.plan.assignments
    compiled(x).sum().backward()
    stats = compiled.last_stats
    assert stats.packed_tensors == 1
    assert stats.raw_bytes_replaced == 512 * 256 * 4
    assert stats.packed_bytes == assignment.bytes_after



def test_each_packed_payload_is_freed_after_its_last_use_in_backward():
    """Backward frees packed payloads as it goes, as autograd frees saved tensors: the deepest
    layers' payloads are gone before the first layers' backward runs (they used to live until the
    whole graph was freed, because every saved tensor's pack hook held the forward's session)."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.GELU())], nn.Linear(256, 4))
    x = torch.randn(128, 256)
    compiled = actcompile(model, budget=0.25, example_inputs=x, codecs=["int8", "int4"])
    compiled(x).sum().backward()

    def live_payload_bytes():
        return sum(runtime.packed_bytes(o.payload) for o in gc.get_objects() if type(o) is runtime._PackedStorage)

    out = compiled(x)
    after_forward = live_payload_bytes()
    assert after_forward >= compiled.last_stats.packed_bytes > 0
    seen = []   # live payload bytes when each Linear's weight gradient is ready, last layer first
    for layer in model[::2]:
        layer.weight.register_hook(lambda g: seen.append(live_payload_bytes()))
    out.sum().backward()
    assert seen == sorted(seen, reverse=True)
    assert seen[len(seen) // 2] < 0.75 * after_forward   # halfway through backward, most are freed
    assert seen[-1] == 0

def test_replans_per_input_signature():
    model, x = small_cnn()
    compiled = actcompile(model, budget=0.25)
    with pytest.raises(RuntimeError, match="not planned yet"):
        compiled.plan
    compiled(x)
    first = compiled.plan
    bigger = torch.randn(8, 3, 48, 48)
    compiled(bigger)
    assert compiled.plan.baseline_bytes > first.baseline_bytes
    compiled(x)
    assert compiled.plan == first
    assert len(compiled._plans) == 2


def test_explain_returns_plan_and_rewrites_nothing():
    model, x = small_cnn()
    plan = explain(model, x, budget="1MB")
    assert isinstance(plan, ModelPlan)
    assert plan.budget_bytes == 10**6 and plan.planned_bytes <= plan.budget_bytes
    assert type(model).forward is type(model).__dict__["forward"]
    text = str(plan)
    assert "codec" in text and "baseline" in text and "budget" in text
    assert ModelPlan.from_json(plan.to_json()) == plan


def test_predicted_heap_adds_autograds_records_to_the_storages():
    """The heap an uncompressed forward grows by is its storages plus autograd's records; the
    plan predicts both, at the per-node reserve, and a saved plan keeps the prediction."""
    model, x = small_cnn()
    wrapped = actcompile(model, budget=1.0, example_inputs=x, codecs=["none"])
    plan, nodes = wrapped.plan, sum(s.autograd_nodes for s in wrapped._graphs.values())
    assert nodes > 0
    reserve = wrapped.compile_config.reserve_bytes_per_node
    assert plan.predicted_heap_bytes == plan.baseline_bytes + reserve * nodes
    assert ModelPlan.from_json(plan.to_json()).predicted_heap_bytes == plan.predicted_heap_bytes


def test_budget_already_met_compresses_nothing():
    model, x = small_cnn()
    plan = explain(model, x, budget=1.0)
    assert plan.regions == () and plan.planned_bytes == plan.baseline_bytes
    assert all(s.reason.name != "NOT_NEEDED" or s.nbytes > 0 for s in plan.skipped)


def test_impossible_budget_names_smallest_achievable():
    model, x = small_cnn()
    with pytest.raises(BudgetError) as info:
        explain(model, x, budget="10KB")
    assert info.value.smallest_bytes > 10_000
    assert str(info.value.smallest_bytes) in str(info.value)


def test_never_compressed_tensors_get_skips_with_reasons():
    model, x = build("resnet18")
    # recompute=False: a recomputed stem frees the max-pool's indices too (a RECOMPUTED skip)
    plan = explain(model, x, budget=0.25, narrow_integers=False, recompute=False)
    reasons = {s.reason.name for s in plan.skipped}
    assert {"PARAMETER", "BUFFER", "INPUT", "NOT_FLOAT", "TOO_SMALL"} <= reasons
    compressed = {(a.node, a.ordinal) for a in plan.assignments if a.codec != "recompute"}   # that names a run
    assert not compressed & {(s.node, s.ordinal) for s in plan.skipped if s.reason.name != "NOT_NEEDED"}
    # by default the max-pool's int64 indices are a candidate of the lossless integer codecs
    narrowed = explain(model, x, budget=0.25)
    assert "NOT_FLOAT" not in {s.reason.name for s in narrowed.skipped}


def test_unknown_codec_and_bad_arguments():
    model, x = small_cnn()
    with pytest.raises(CodecError, match="unknown codec 'lz4'; available"):
        actcompile(model, budget="1GB", codecs=["int8", "lz4"])
    with pytest.raises(TypeError, match="nn.Module"):
        actcompile(lambda t: t, budget="1GB")
    with pytest.raises(ValueError, match="accepted"):
        actcompile(model, budget="lots")


def test_keyword_and_positional_calls():
    model, x = build("bert")
    compiled = actcompile(model, budget=0.5)
    out = compiled(input_ids=x)
    torch.manual_seed(0)
    assert out.logits.shape[:2] == x.shape
    assert compiled.plan.planned_bytes <= compiled.plan.budget_bytes


def test_lstm_workspace_is_recomputed_exactly():
    from actcompile.measure import compare_gradients, forward_backward

    model, x = build("lstm")
    compiled = actcompile(model, budget=0.25, example_inputs=x)
    assert [r.codec for r in compiled.plan.regions] == ["recompute"]
    _, ref = forward_backward(model, x)
    _, got = forward_backward(compiled, x)
    cosine, rel = compare_gradients(ref, got)
    assert rel < 1e-5, f"recompute changed gradients: rel err {rel:.3g}"


def test_branch_not_taken_at_planning_time_still_runs_correctly():
    from actcompile.measure import compare_gradients, forward_backward

    model, _ = build("branchy")
    bright, dark = torch.rand(4, 3, 32, 32), -torch.rand(4, 3, 32, 32)
    compiled = actcompile(model, budget=0.3, example_inputs=bright, recompute=False)
    ref_out, ref = forward_backward(model, dark)
    out, got = forward_backward(compiled, dark)
    assert torch.equal(out, ref_out)
    assert compare_gradients(ref, got)[0] > 0.999


class _ShapeBranch(nn.Module):
    """The other branch saves tensors of other shapes: the plan's guards must notice."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 32, 3, padding=1), nn.Linear(32, 4)

    def forward(self, x):
        if x.mean() > 0:
            h = torch.relu(self.conv(x))
        else:
            h = torch.relu(self.conv(nn.functional.avg_pool2d(x, 2)))
        return self.head(torch.tanh(h).mean(dim=(2, 3)))


def test_branch_taken_later_is_captured_and_planned_when_it_first_runs():
    """The other branch saves tensors of other shapes: Dynamo captures it as a graph of its own."""
    from actcompile.measure import compare_gradients, forward_backward

    model = _ShapeBranch()
    bright, dark = torch.rand(4, 3, 32, 32), -torch.rand(4, 3, 32, 32)
    compiled = actcompile(model, budget=0.3, example_inputs=bright, recompute=False)
    planned_graphs = [s.graph for s in compiled.plan.sections]
    ref_out, ref = forward_backward(model, dark)
    out, got = forward_backward(compiled, dark)
    assert torch.equal(out, ref_out)
    assert compiled.last_stats.guard_failures == 0 and compiled.last_stats.packed_tensors > 0
    assert [s.graph for s in compiled.plan.sections] != planned_graphs, "the plan must show the graphs that ran"
    assert compiled.plan.planned_bytes <= 0.3 * compiled.plan.baseline_bytes + 1
    assert compare_gradients(ref, got)[0] > 0.999


def test_epsilon_ladder_outside_open_unit_interval_is_rejected():
    model, x = small_cnn()
    with pytest.raises(ValueError, match=r"each epsilon must be in \(0, 1\)"):
        actcompile(model, budget=0.25, example_inputs=x, epsilons=(0.1, 1.5))


@pytest.mark.cuda
def test_cuda_budget_on_device_memory():
    model, x = build("resnet18")
    model, x = model.cuda(), x.cuda()
    compiled = actcompile(model, budget=0.25, example_inputs=x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = compiled(x)
    graph = out.grad_fn
    del out
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    assert kept <= compiled.plan.budget_bytes, f"kept {kept} B > budget {compiled.plan.budget_bytes} B"
    del graph
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    assert torch.equal(a, compiled(x))


def _near_identical_photos():
    """One bundled photo (scikit-learn), four times with a little noise: smooth and low-rank."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    image = torch.tensor(np.stack(load_sample_images().images[:1]), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    x = nn.functional.interpolate(image, size=(64, 96), mode="bilinear", align_corners=False).repeat(4, 1, 1, 1)
    return x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("codec", ["dct", "hosvd", "threshold", "svd", "fft_lowpass", "wavelet"])
def test_variable_rate_codecs_plug_into_the_policy(codec):
    """Registered codecs are chosen on the ε ladder with no policy change; each is capped at its plan."""
    from actcompile.measure import compare_gradients, forward_backward
    from actcompile.zoo import UNet

    torch.manual_seed(0)
    model, x = UNet().train(), _near_identical_photos()
    compiled = actcompile(model, budget=0.9, example_inputs=x, codecs=[codec], epsilons=(0.05, 0.2, 0.45),
                          recompute=False)   # recomputing a segment would meet this budget as well
    used = [a for a in compiled.plan.assignments if a.codec == codec]
    assert used, f"{codec} was never chosen"
    assert all(dict(a.options)["max_bytes"] == a.bytes_after for a in used)
    ref_out, ref = forward_backward(model, x)
    out, grads = forward_backward(compiled, x)
    assert torch.equal(out, ref_out)
    stats = compiled.last_stats
    assert stats.packed_bytes <= sum(a.bytes_after for a in compiled.plan.assignments)
    assert compare_gradients(ref, grads)[0] > 0.9


class _BrokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return torch.tanh(self.b(x))


class _BlockTwice(nn.Module):
    """One block (split by a graph break) called twice: its graphs run twice per forward."""

    def __init__(self):
        super().__init__()
        self.block = _BrokenBlock()

    def forward(self, x):
        return self.block(2 * self.block(x))


@pytest.mark.parametrize("name", ["inplace_cnn", "branchy", "twice"])   # dropout; a graph break; graphs run twice
def test_planning_calibrates_inside_the_capture_forward(monkeypatch, name):
    """One real forward both captures the graphs and calibrates the codecs on their saves: no
    calibration forward of its own, and the plan is the one a separate calibration forward makes."""
    import actcompile.api as api

    if name == "twice":
        torch.manual_seed(0)
        model, x = _BlockTwice(), torch.randn(64, 256)
    else:
        model, x = build(name)
    forwards = []
    calibrate = api.calibrate
    monkeypatch.setattr(api, "calibrate", lambda *a, **k: forwards.append(a[0].name) or calibrate(*a, **k))
    one = explain(model, x, budget=0.25, recompute=False)
    assert one.assignments and forwards == []
    monkeypatch.setattr(api, "_early_calibrator", lambda graph, config, whole: api.Calibrator({}))
    two = explain(model, x, budget=0.25, recompute=False)
    assert forwards, "the fallback (nothing measured in the capture) calibrates in a forward of its own"

    def rows(plan):
        return [(a.node, a.ordinal, a.codec, a.epsilon, a.error, a.bytes_after) for a in plan.assignments]
    assert rows(one) == rows(two)


class _CountingHook(nn.Module):
    """A forward hook counting calls in a dict, and a full backward hook (a graph break around the
    hooked block): each new count re-captures the hook's frame during training, and that graph
    keeps nothing but what it returns."""

    def __init__(self):
        super().__init__()
        self.counts = {"forward": 0}
        self.l1, self.l3 = nn.Linear(128, 256), nn.Linear(256, 10)
        self.mid = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
        self.mid.register_forward_hook(self._count)
        self.mid.register_full_backward_hook(lambda module, grad_in, grad_out: None)

    def _count(self, module, inputs, output):
        self.counts["forward"] += 1
        return output * 1.25

    def forward(self, x):
        return self.l3(nn.functional.gelu(self.mid(torch.tanh(self.l1(x)))))


def test_a_graph_captured_in_training_that_cannot_reach_the_ratio_runs_with_a_warning():
    """Such a graph was planned at the budget's ratio and raised BudgetError mid-training (a
    survey's logging hook stopped the first step). It now keeps the least it can, with a
    PlanDriftWarning, and training goes on with the plain model's gradients."""
    from actcompile import PlanDriftWarning

    torch.manual_seed(0)
    model, x = _CountingHook(), torch.randn(512, 128)
    reference = copy.deepcopy(model)
    compiled = actcompile(model, budget=0.25, example_inputs=x)
    with pytest.warns(PlanDriftWarning, match="captured during training"):
        for _ in range(2):
            compiled.zero_grad(set_to_none=True)
            compiled(x).sum().backward()
    reference(x).sum().backward()
    cosine = nn.functional.cosine_similarity(model.l1.weight.grad.flatten(), reference.l1.weight.grad.flatten(), dim=0)
    assert cosine > 0.999, f"gradient cosine {cosine:.5f}"
