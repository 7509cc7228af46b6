"""The 'done' numbers of the core pipeline, measured on every reference model.

Each model is measured once, in its own process started with MALLOC_ARENA_MAX=1 (so glibc's
heap counters see every allocation): the analyzer's prediction against the heap the real
forward keeps, and the compressed module at a quarter of the baseline against that budget.
"""

import functools

import pytest

from actcompile.measure import run_isolated
from actcompile.zoo import TRACE_SUITE

BUDGET = 0.25
MIN_COSINE = {"resnet18": 0.999, "gpt2": 0.99}


@functools.lru_cache(maxsize=None)
def measured(name):
    return run_isolated(name, BUDGET, timed=False)   # no test asserts a time


@pytest.mark.parametrize("name", TRACE_SUITE)
def test_analyzer_predicts_what_the_forward_keeps(name):
    r = measured(name)
    diff = abs(r["predicted_bytes"] - r["measured_bytes"])
    tolerance = max(0.03 * r["measured_bytes"], 64 * 1024)
    assert diff <= tolerance, (f"{name}: predicted {r['predicted_bytes']} B, heap shows {r['measured_bytes']} B "
                               f"(off by {diff} B > {tolerance:.0f} B)")


@pytest.mark.parametrize("name", TRACE_SUITE)
def test_quarter_budget_is_met_on_measured_bytes(name):
    r = measured(name)
    assert r["planned_bytes"] <= r["budget_bytes"]
    assert r["measured_compressed_bytes"] <= r["budget_bytes"], (
        f"{name}: heap kept {r['measured_compressed_bytes']} B > budget {r['budget_bytes']} B")


@pytest.mark.parametrize("name", TRACE_SUITE)
def test_forward_bit_identical_and_gradients_close(name):
    r = measured(name)
    assert r["forward_max_abs_diff"] == 0.0, f"{name}: forward changed by {r['forward_max_abs_diff']}"
    floor = MIN_COSINE.get(name, 0.99)
    assert r["grad_cosine"] >= floor, f"{name}: gradient cosine {r['grad_cosine']:.5f} < {floor}"
