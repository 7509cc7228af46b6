"""The one place ``node.meta`` keys are spelled, with typed readers and writers.

>>> import torch
>>> from actcompile.passes.capture import capture_graphs
>>> (graph,) = capture_graphs(torch.nn.Linear(4, 4), torch.randn(2, 4))
>>> linear = next(n for n in graph.gm.graph.nodes if n.op == "call_function")
>>> tuple(get_val(linear).shape)
(2, 4)
"""

from __future__ import annotations

import torch.fx

VAL = "val"                      # FakeTensor (or structure of them) of the node's output
DYNAMO_VAL = "example_value"     # Dynamo's spelling of the same
GRAPHARG = "grapharg"            # Dynamo's record of where a placeholder's value comes from
MODULE_STATE = "actcompile_module_state"   # a placeholder whose value the program holds beyond the forward


def get_val(node: torch.fx.Node):
    """The node's example value (FakeTensor or nested structure), or ``None``."""
    return node.meta.get(VAL, node.meta.get(DYNAMO_VAL))


def set_val(node: torch.fx.Node, value) -> None:
    node.meta[VAL] = value


def placeholder_source(node: torch.fx.Node):
    """Dynamo's ``Source`` of a placeholder (``LocalSource('x')``, an attribute path, ...), or ``None``."""
    return getattr(node.meta.get(GRAPHARG), "source", None)


def mark_module_state(node: torch.fx.Node) -> None:
    """Record that a placeholder's value is held beyond the forward (a parameter, a buffer, an
    attribute: Dynamo lifts them into graph inputs; a plain forward reads them where they live)."""
    node.meta[MODULE_STATE] = True


def is_module_state(node: torch.fx.Node) -> bool:
    return bool(node.meta.get(MODULE_STATE, False))
