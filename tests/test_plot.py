"""plan.plot(): the picture's bars add up to the plan, and it is written headless."""

import re
import sys

import pytest

from actcompile import ModelPlan, explain
from actcompile.plan import SkipReason
from actcompile.plot import plot_rows
from actcompile.zoo import build


@pytest.fixture(scope="module")
def plans():
    out = {}
    for name in ("inplace_cnn", "branchy"):   # a recomputed segment; two graphs (a graph break)
        model, x = build(name)
        out[name] = explain(model, x, budget=0.25)
    return out


@pytest.mark.parametrize("name", ["inplace_cnn", "branchy"])
def test_bars_add_up_to_the_baseline_and_the_planned_bytes(plans, name):
    plan = plans[name]
    rows = plot_rows(plan)
    assert all(r.before >= r.after >= 0 for r in rows), rows
    assert sum(r.before for r in rows) == plan.baseline_bytes
    assert sum(r.after for r in rows) == plan.planned_bytes
    assert {r.graph for r in rows} == {s.graph for s in plan.sections}
    assert any(r.kind != "kept" for r in rows)


def test_outputs_bar_is_what_the_forward_returns_and_recompute_frees_small_saves_too(plans):
    plan = plans["inplace_cnn"]
    assert any(a.codec == "recompute" for a in plan.assignments)
    # the logits, 4 x 10 float32: the only bytes no node's record accounts for. It was -96 B while
    # a recomputed node's small saves were listed both as freed (in the recompute) and as kept
    assert plot_rows(plan)[-1][1:4] == ("outputs", 160, 160)
    recomputed = {s.node for s in plan.skipped if s.reason is SkipReason.RECOMPUTED}
    assert not [s for s in plan.skipped if s.node in recomputed and s.reason is SkipReason.TOO_SMALL]


def test_node_order_survives_json_and_old_plans_still_plot(plans):
    plan = plans["branchy"]
    again = ModelPlan.from_json(plan.to_json())
    assert again == plan and all(s.plan.node_order for s in again.sections)
    text = plan.to_json().replace('"node_order"', '"ignored"')   # a plan saved before the order was kept
    old = ModelPlan.from_json(text)
    assert all(s.plan.node_order == () for s in old.sections)
    assert sum(r.after for r in plot_rows(old)) == plan.planned_bytes


def test_plot_writes_png_and_svg_with_the_budget_line(plans, tmp_path):
    plan = plans["inplace_cnn"]
    plan.plot(tmp_path / "plan.png")
    data = (tmp_path / "plan.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    plan.sections[0].plan.plot(tmp_path / "section.svg")
    svg = (tmp_path / "section.svg").read_text()
    texts = re.findall(r"<text[^>]*>([^<]*)<", svg)
    kinds = {r.kind for r in plot_rows(plan)}   # the legend names what the plan does
    assert "budget" in texts and kinds <= set(texts), " | ".join(texts)


def test_without_matplotlib_the_error_says_what_to_install(plans, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"actcompile\[plot\]"):
        plans["inplace_cnn"].plot(tmp_path / "plan.png")
