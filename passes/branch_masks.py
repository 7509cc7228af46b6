"""Compiled back end: save the masks backward would recompute from a packed value, exactly, as bits.

Inductor's min-cut partitioner often saves a convolution's output and recomputes BatchNorm and
the ReLU6 (or ReLU) mask from it in backward: cheap, and exact while the saved value is. Once
that value is packed, every element the codec moves across the mask's edge flips its gradient
(MobileNetV2, every saved value int8: parameter-gradient cosine 0.987 on a 5-block trunk; the
eager back end, which sees ReLU6's own saved result and keeps it as a 1-bit mask: 0.99999).

:func:`save_branch_masks_` finds each comparison in the backward computed (through pointwise
ops only) from saved values, at least one of which the plan packs; copies that computation
into the forward, where the values are exact; and saves its result packed at 1 bit per element
(``pack_bits``). The backward reads the unpacked mask instead of recomputing it. Values the
mask was recomputed from stay saved for their other uses (BatchNorm's backward); their codec
error then only scales gradients, it no longer flips them.

Before/after, backward::

    convolution (saved, int8)             convolution (saved, int8)    mask_bits (saved, 1 bit)
    sub = convolution - mean              ...unpack → mask
    ... le = sub*rstd*w+b <= 0            where(mask, 0, grad)
    where(le | ge, 0, grad)
"""

from __future__ import annotations

import torch
import torch.fx

from actcompile.codecs.bits import pack_bits, unpack_bits

aten = torch.ops.aten
COMPARISONS = frozenset({aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar,
                         aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.eq.Tensor})
_LOGICAL = frozenset({aten.bitwise_or.Tensor, aten.logical_or.default, aten.bitwise_and.Tensor,
                      aten.logical_and.default, aten.bitwise_not.default, aten.logical_not.default})
MAX_NODES = 48   # a mask recomputed through more ops than this is left alone


def _pointwise(node: torch.fx.Node) -> bool:
    """Elementwise, or a view (the per-channel statistics are broadcast through ``unsqueeze``)."""
    return node.op == "call_function" and (torch.Tag.pointwise in getattr(node.target, "tags", ())
                                           or getattr(node.target, "is_view", False))


def _recomputation(mask: torch.fx.Node, saved: set[str]) -> list[torch.fx.Node] | None:
    """The backward nodes ``mask`` is computed from, if all are pointwise over saved values."""
    nodes, stack, seen = [], [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if node.name not in saved:
                return None          # reads a tangent: only backward can compute it
            continue
        if not _pointwise(node) or len(nodes) >= MAX_NODES:
            return None
        nodes.append(node)
        stack.extend(node.all_input_nodes)
    return nodes


def _widest_masks(bwd: torch.fx.Graph) -> list[torch.fx.Node]:
    """Bool nodes made by comparisons and their logical combinations, largest first (so
    ``(x <= 0) | (x >= 6)`` is moved whole rather than as its two halves)."""
    masks = [n for n in bwd.nodes if n.op == "call_function" and n.target in COMPARISONS | _LOGICAL
             and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bool]
    outer = [n for n in masks if not any(u.target in _LOGICAL for u in n.users)]
    return outer


def save_branch_masks_(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, num_fwd_outputs: int,
                       packed: set[str], fake_mode) -> list[str]:
    """Move every mask the backward recomputes from a value in ``packed`` into the forward (1 bit
    per element saved); returns the names of the moved masks. ``fwd`` and ``bwd`` are rewritten."""
    from actcompile.passes.inductor import _in_logical_order, _inline, _trace, crossing_placeholder, storage_orders

    output = fwd.graph.output_node()
    outputs = list(output.args[0])
    saved = {n.name for n in outputs[num_fwd_outputs:] if isinstance(n, torch.fx.Node)}
    in_forward = {n.name: n for n in fwd.graph.nodes}
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    orders = storage_orders(fwd)
    moved = []
    for mask in _widest_masks(bwd.graph):
        nodes = _recomputation(mask, saved)
        if not nodes:
            continue
        sources = {a.name for n in nodes for a in n.all_input_nodes if a.op == "placeholder"}
        if not sources & packed:
            continue
        # forward: the same ops on the exact values, then 1-bit packing, saved after its sources
        order = {n: i for i, n in enumerate(bwd.graph.nodes)}
        env = {}
        with fwd.graph.inserting_before(output):
            for node in sorted(nodes, key=order.__getitem__):
                copy = fwd.graph.node_copy(node, lambda a: env[a] if a in env else in_forward[a.name])
                copy.meta = dict(node.meta)
                env[node] = copy
            val = mask.meta["val"]
            # bits in the storage order of the values the mask is computed from (channels-last
            # under Inductor's layout optimization): a contiguous pass instead of a transposing one
            order = next((orders[s] for s in sorted(sources) if s in orders
                          and tuple(in_forward[s].meta["val"].shape) == tuple(val.shape)), None)
            permuted = tuple(val.shape) if order is None else tuple(val.shape[d] for d in order)
            pack_gm = _trace(lambda m: pack_bits(m if order is None else m.permute(order), 1), (val,), fake_mode)
            bits = _inline(fwd.graph, pack_gm, [env[mask]])
        tensors = [s for s in sources if isinstance(in_forward[s].meta.get("val"), torch.Tensor)]
        last_source = max(outputs.index(in_forward[s]) for s in tensors)   # saved symints come after tensors
        outputs.insert(last_source + 1, bits)
        # backward: a placeholder for the bits (same position), unpacked where the mask was
        after = placeholders[outputs[last_source].name]
        ph = crossing_placeholder(fwd, bwd, bits, before=after.next)
        unpack_gm = _trace(lambda b: _in_logical_order(unpack_bits(b, 1, val.numel(), torch.int32, shape=permuted) != 0,
                                                       order),
                           (bits.meta["val"],), fake_mode)
        with bwd.graph.inserting_before(mask):
            decoded = _inline(bwd.graph, unpack_gm, [ph])
        mask.replace_all_uses_with(decoded)
        placeholders[bits.name] = ph
        moved.append(bits.name)
    if moved:
        output.args = (tuple(outputs),)
        for gm in (fwd, bwd):
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
    return moved
