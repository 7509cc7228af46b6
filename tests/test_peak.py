"""budget_scope="peak": the budget bounds a training step's high-water mark (passes/peak.py).

The measured tests run in a child process with ``MALLOC_ARENA_MAX=1`` and
``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor above 64 KiB its own mapping, returned when
freed), where ``VmHWM`` over one forward+backward is the step's peak
(:func:`actcompile.measure.step_high_water`).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from actcompile import BudgetError, actcompile, explain
from actcompile.plan import ModelPlan
from actcompile.passes.peak import optimizer_state_bytes, resident_bytes

_CHILD = r"""
import json, sys, torch
from torch import nn
from actcompile import actcompile
from actcompile.measure import step_high_water
from actcompile.passes.peak import optimizer_state_bytes, resident_bytes

def build():
    torch.manual_seed(0)
    layers, width = [], 3
    for w in (32, 64, 64, 64):
        layers += [nn.Conv2d(width, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        width = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

x = torch.randn(16, 3, 64, 64)
rows = []
for fraction in json.loads(sys.argv[1]):
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    compiled = actcompile(model, budget=fraction, budget_scope="peak", optimizer=optimizer, example_inputs=x)
    static = resident_bytes(model) + optimizer_state_bytes(optimizer)

    def step():
        compiled(x).sum().backward()

    for _ in range(3):   # plan, Adam's state, warm caches
        optimizer.zero_grad(set_to_none=True)
        step()
        optimizer.step()
    measured = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        measured.append(static + step_high_water(step))
    plan = compiled.plan
    rows.append(dict(fraction=fraction, budget=plan.peak_budget_bytes, predicted=plan.predicted_peak_bytes,
                     measured=min(measured), compressed=len(plan.assignments)))
print(json.dumps(rows))
"""


def _measured_peaks(fractions: list[float]) -> list[dict]:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", ACTCOMPILE_COMPILE_CODECS="0")
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(fractions)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and glibc's malloc options are Linux's")
def test_measured_peak_stays_within_five_percent_of_four_budgets_and_grows_with_them():
    rows = _measured_peaks([0.95, 0.9, 0.85, 0.75])
    for row in rows:
        assert row["compressed"] > 0, f"at {row['fraction']} nothing was compressed: {row}"
        assert row["measured"] <= row["budget"] * 1.05, (
            f"at {row['fraction']}: measured peak {row['measured']} B > 1.05 × budget {row['budget']} B")
        assert abs(row["predicted"] - row["measured"]) <= 0.05 * row["measured"], (
            f"at {row['fraction']}: predicted peak {row['predicted']} B, measured {row['measured']} B (> 5% apart)")
    for larger, smaller in zip(rows, rows[1:]):
        assert smaller["measured"] <= larger["measured"] * 1.01, (
            f"peak not monotone in the budget: {larger['fraction']} -> {larger['measured']} B, "
            f"{smaller['fraction']} -> {smaller['measured']} B")
    assert rows[-1]["measured"] < 0.8 * rows[0]["budget"] / 0.95, "the smallest budget must lower the peak by > 20%"


def test_optimizer_state_prediction_matches_the_state_after_a_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    for make in (lambda p: torch.optim.Adam(p), lambda p: torch.optim.AdamW(p, amsgrad=True),
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.RMSprop(p, centered=True)):
        optimizer = make(model.parameters())
        predicted = optimizer_state_bytes(optimizer)
        model(torch.randn(4, 32)).sum().backward()
        optimizer.step()
        steps = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for k, v in s.items()
                    if k == "step" and isinstance(v, torch.Tensor))
        measured = optimizer_state_bytes(optimizer) - steps   # Adam's step counters are scalars
        assert predicted == measured, f"{type(optimizer).__name__}: predicted {predicted} B, state holds {measured} B"
    assert optimizer_state_bytes(torch.optim.SGD(model.parameters(), lr=0.1)) == 0
    assert resident_bytes(model) == sum(p.numel() * 4 for p in model.parameters())


def test_peak_plan_is_reported_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 32 * 32, 4))
    x = torch.randn(8, 3, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bare = explain(model, x, budget=1.0, budget_scope="peak")
    whole = explain(model, x, budget=1.0, budget_scope="peak", optimizer=optimizer)
    plan = explain(model, x, budget=0.85, budget_scope="peak", optimizer=optimizer)
    assert whole.predicted_peak_bytes - bare.predicted_peak_bytes == resident_bytes(model), "momentum: one copy"
    assert plan.peak_budget_bytes == int(0.85 * whole.predicted_peak_bytes)   # a fraction of the uncompressed peak
    assert plan.planned_bytes < whole.planned_bytes, "a lower peak budget must keep fewer activation bytes"
    assert "step peak" in str(plan)
    assert ModelPlan.from_json(plan.to_json()) == plan
    assert ModelPlan.from_json(plan.to_json()).predicted_peak_bytes == plan.predicted_peak_bytes


def test_peak_budget_below_parameters_and_state_names_the_least_peak():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    static = 3 * resident_bytes(model)   # the weights and Adam's two moments
    with pytest.raises(BudgetError, match=f"optimizer state alone take .* \\({static} B\\)"):
        explain(model, torch.randn(64, 256), budget=100_000, budget_scope="peak",
                optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(BudgetError, match="the least predicted is"):   # above them, but below any plan's peak
        explain(model, torch.randn(64, 256), budget=static + 50_000, budget_scope="peak",
                optimizer=torch.optim.Adam(model.parameters()))


@pytest.mark.parametrize("options, message", [
    (dict(budget=0.5, budget_scope="step"), "budget_scope='step'"),
    (dict(tolerance=0.01, budget_scope="peak"), "needs budget="),
    (dict(budget=0.5, optimizer="adam"), "must be a torch.optim.Optimizer"),
    (dict(budget=0.5, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), "needs budget_scope='peak'"),
])
def test_bad_peak_options_are_named(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        actcompile(nn.Linear(4, 4), **options)


def test_an_optimizer_of_unknown_state_must_have_stepped():
    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    with pytest.raises(ValueError, match="take one optimizer step"):
        actcompile(nn.Linear(4, 4), budget=0.5, budget_scope="peak", optimizer=Custom(nn.Linear(4, 4).parameters()))


def test_inductor_back_end_refuses_peak_scope():
    from actcompile import backend

    with pytest.raises(ValueError, match="not supported by the Inductor back end"):
        backend(budget=0.5, budget_scope="peak")
