"""The one place ``node.meta`` keys are spelled, with typed readers and writers.

>>> import torch, torch.fx
>>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
>>> node = next(iter(gm.graph.nodes))
>>> set_opaque(node, True); is_opaque(node)
True
"""

from __future__ import annotations

import torch.fx

VAL = "val"                      # FakeTensor (or structure of them) of the node's output
DYNAMO_VAL = "example_value"     # Dynamo's spelling of the same
OPAQUE = "actcompile_opaque"     # True on call_module nodes the tracer could not see into
SOURCE = "actcompile_source"     # where the node came from, for error messages


def get_val(node: torch.fx.Node):
    """The node's example value (FakeTensor or nested structure), or ``None``."""
    return node.meta.get(VAL, node.meta.get(DYNAMO_VAL))


def set_val(node: torch.fx.Node, value) -> None:
    node.meta[VAL] = value


def is_opaque(node: torch.fx.Node) -> bool:
    return bool(node.meta.get(OPAQUE, False))


def set_opaque(node: torch.fx.Node, opaque: bool) -> None:
    node.meta[OPAQUE] = opaque
