"""Compiled back end: save the forward's inputs as they are, not as Inductor's channels-last copies.

A saved value that is a forward input (a conv weight, the caller's image) costs nothing: it is
held anyway. But Inductor's layout optimization (always on CPU with mkldnn, on GPUs for conv
nets) gives every dense 4-D forward output along a convolution chain channels-last strides, the
saved ones included (``GraphLowering.run_node``: non-user-visible outputs in
``nodes_prefer_channels_last``). For a saved input that stride change is a *copy*, made in the
forward and held until backward: on ResNet-18 (batch 8, 64×64) 46 MB of weight copies beside a
plan of 2.8 MB, more than all the activations it saves. (``prims.inductor_force_stride_order`` on
the saved value does not stop it; the stride requirement is applied after.)

:func:`save_inputs_flat_` saves such a value as a 1-D view of itself instead: a 1-D output has no
channels-last form, so Inductor returns the input's own storage. The backward views it back to
its shape before the first use; Inductor converts it there, for the kernel that reads it, and
frees the converted copy after, so it is transient instead of held for the whole step.

Before/after::

    forward:  return (out, primals_1, relu)       primals_1_flat = view(primals_1, [N]); return (out, primals_1_flat, relu)
    backward: (primals_1, relu, tangent)          (primals_1_flat, relu, tangent)
              convolution_backward(..., primals_1)  primals_1 = view(primals_1_flat, shape); convolution_backward(...)
"""

from __future__ import annotations

import torch
import torch.fx

from actcompile.passes.inductor import _channels_last_nodes, _first_use, _views_an_input, crossing_placeholder

aten = torch.ops.aten


def save_inputs_flat_(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, num_fwd_outputs: int) -> list[str]:
    """Rewrite ``fwd``/``bwd`` in place so every saved 4-D input (or contiguous view of one) that
    Inductor would copy to channels-last crosses as a 1-D view. Returns the names it rewrote."""
    channels_last = _channels_last_nodes(fwd)
    if not channels_last:
        return []
    output = fwd.graph.output_node()
    outputs = list(output.args[0])
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    rewritten = []
    for position in range(num_fwd_outputs, len(outputs)):
        node = outputs[position]
        if not isinstance(node, torch.fx.Node) or node.name not in channels_last or not _views_an_input(node):
            continue
        val, in_backward = node.meta.get("val"), placeholders.get(node.name)
        if (not isinstance(val, torch.Tensor) or val.dim() != 4 or not val.is_contiguous()
                or in_backward is None or not in_backward.users):
            continue
        with fwd.graph.inserting_before(output):
            flat = fwd.graph.call_function(aten.view.default, (node, [val.numel()]))
        flat.meta["val"] = val.view(-1)
        outputs[position] = flat
        flat_in = crossing_placeholder(fwd, bwd, flat, before=in_backward)   # keeps the saved order
        with bwd.graph.inserting_before(_first_use(in_backward)):
            shaped = bwd.graph.call_function(aten.view.default, (flat_in, list(val.shape)))
        shaped.meta["val"] = val
        in_backward.replace_all_uses_with(shaped)
        bwd.graph.erase_node(in_backward)
        rewritten.append(node.name)
    if rewritten:
        output.args = (tuple(outputs),)
        for gm in (fwd, bwd):
            gm.graph.lint()
            gm.recompile()
    return rewritten
