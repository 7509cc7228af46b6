"""Measure, on the real example inputs, the error each candidate codec makes on each saved tensor.

The policy's error model is measured, not guessed from a codec's nominal ε: the graph runs
forward once on the real inputs (buffers and RNG restored afterwards), and each candidate
saved tensor is packed and unpacked by every codec the policy may choose for it, right when
autograd saves it; the tensor is then dropped, so calibration holds no activations either.
It also checks that the real forward saves what the (fake) profile predicted.

>>> import torch
>>> from actcompile.codecs import get_codec
>>> from actcompile.passes.capture import capture_graphs
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
>>> (graph,) = capture_graphs(model, torch.randn(64, 256))
>>> result = calibrate(graph, {("input_2", 0): [get_codec("int8")]})
>>> err, nbytes = result[("input_2", 0)][0][1:]
>>> err < 0.01, nbytes
(True, 16896)
"""

from __future__ import annotations

import warnings

import torch
import torch.fx

from actcompile.codecs.base import packed_bytes, relative_error
from actcompile.errors import ActCompileError, PlanDriftWarning
from actcompile.runtime import packable_view
from actcompile.passes.capture import CapturedGraph
from actcompile.passes.memory import record_saves

Key = tuple[str, int]


def calibrate(graph: CapturedGraph, choices: dict[Key, list],
              expected: dict[Key, tuple] | None = None) -> dict[Key, list[tuple[object, float, int]]]:
    """For each ``(node, ordinal)`` in ``choices``: ``[(codec, relative error, packed bytes), ...]``.

    Runs ``graph`` on the real inputs it was captured with. ``expected`` maps keys to the
    ``(shape, dtype)`` the profile predicted; a mismatch raises.
    """
    results: dict[Key, list] = {}

    def on_save(node, ordinal, t, kind):
        key = (node, ordinal)
        codecs = choices.get(key)
        if codecs is None:
            return
        if expected is not None and expected[key] != (tuple(t.shape), str(t.dtype).removeprefix("torch.")):
            raise ActCompileError(
                f"calibration: node {node} save #{ordinal} is {tuple(t.shape)} {t.dtype} on the real "
                f"inputs but {expected[key]} in the profile; the graph does not run the same way twice"
            )
        x = packable_view(t.detach())
        with torch.no_grad(), warnings.catch_warnings():
            # a narrow dtype the values do not fit is expected here: measured as no saving, not warned
            warnings.simplefilter("ignore", PlanDriftWarning)
            results[key] = [(codec, relative_error(x, codec.unpack(packed)), packed_bytes(packed))
                            for codec in codecs for packed in (codec.pack(x),)]

    record_saves(graph.gm, graph.flat_inputs, on_save, fake=False, input_kinds=graph.input_kinds)
    missing = set(choices) - set(results)
    if missing:
        raise ActCompileError(f"calibration: the real forward never saved {sorted(missing)[:5]} (predicted by the profile)")
    return results
