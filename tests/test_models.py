"""The 'done' numbers of the core pipeline, measured on every reference model.

Each model is measured once, in its own process started with MALLOC_ARENA_MAX=1 (so glibc's
heap counters see every allocation): the analyzer's prediction against the heap the real
forward keeps, and the compressed module at a quarter of the baseline against that budget.
"""

import concurrent.futures
import functools

import pytest

from actcompile.measure import MeasureError, run_isolated
from actcompile.zoo import TRACE_SUITE

BUDGET = 0.25
MIN_COSINE = {"resnet18": 0.999, "gpt2": 0.99}


@functools.lru_cache(maxsize=None)
def _measured_all() -> dict:
    """Every model measured once, two processes at a time (no test here asserts a time, and each
    process reads only its own heap): {name: result or the MeasureError it raised}."""
    def one(name):
        try:
            return run_isolated(name, BUDGET, timed=False, threads=1)
        except MeasureError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(TRACE_SUITE, pool.map(one, TRACE_SUITE)))


def measured(name):
    result = _measured_all()[name]
    if isinstance(result, MeasureError):
        raise result
    return result


# Models whose forward Dynamo captures differently from its eager run, and why: the captured
# graph is what actcompile runs (and plans), so only there the analyzer is held to 2%.
CAPTURED_DIFFERS = {
    # Hugging Face without a KV cache cannot check a traced position_ids for packed sequences:
    # it builds a dense 4-D mask and SDPA repeats the key/value heads (+6-7% kept).
    "llama": 1.10,
}


@pytest.mark.parametrize("name", TRACE_SUITE)
def test_analyzer_predicts_what_the_forward_keeps(name):
    """Within 2% (or 64 KiB) of the heap the captured forward keeps (the model run by actcompile at
    budget 1.0), and of the eager forward's where Dynamo captures what eager runs."""
    r = measured(name)
    for what in ("measured_captured_bytes", "measured_bytes"):
        if what == "measured_bytes" and name in CAPTURED_DIFFERS:
            ratio = r["measured_captured_bytes"] / r["measured_bytes"]
            assert 1.0 < ratio <= CAPTURED_DIFFERS[name], f"{name}: captured/eager kept {ratio:.3f}"
            continue
        diff = abs(r["predicted_bytes"] - r[what])
        tolerance = max(0.02 * r[what], 64 * 1024)
        assert diff <= tolerance, (f"{name}: predicted {r['predicted_bytes']} B, heap shows {r[what]} B ({what}; "
                                   f"off by {diff} B > {tolerance:.0f} B)")


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
