"""Rewrite a captured graph so that the plan's saved tensors go through their codecs.

``emit_regions`` copies the graph and brackets every node the plan compresses with
:func:`actcompile.runtime.begin_node` / :func:`~actcompile.runtime.end_node` markers, and
routes every node the plan recomputes through :func:`actcompile.runtime.recompute`. The result
is a :class:`CompressedGraphModule`: a GraphModule that, in training mode with grad enabled,
runs its forward inside :func:`actcompile.runtime.compressing` (the hooks are removed even if
the forward raises); in eval mode or under ``torch.no_grad()`` it runs the graph untouched.
The markers only set which node is running, so forward values are bit-identical.

Before/after, for a plan that masks the output of ``relu``::

    relu = self.relu(conv)                       begin_node('relu')
                                                 relu = self.relu(conv)
                                                 end_node()

>>> import torch
>>> from actcompile.plan import Assignment, Plan, Region
>>> from actcompile.passes.capture import capture_graphs
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
>>> (graph,) = capture_graphs(model, torch.randn(4, 8))
>>> a = Assignment("input_2", 0, "mask", (), None, 128, 8, 0.0, (4, 8), "float32")
>>> plan = Plan(budget_bytes=64, baseline_bytes=128, regions=(Region("r0", "mask", None, (a,)),), skipped=())
>>> out = emit_regions(graph.gm, plan)
>>> [n.name for n in out.graph.nodes if n.op == "call_function"]
['input_1', 'begin_node', 'input_2', 'end_node']
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from actcompile import meta, runtime
from actcompile.codecs import get_codec
from actcompile.codecs.kernels import CompiledCodec
from actcompile.plan import RECOMPUTE, Plan, SkipReason


class CompressedGraphModule(torch.fx.GraphModule):
    """A GraphModule whose training forwards compress the saved tensors its plan names."""

    def __init__(self, root, graph: torch.fx.Graph, table: dict, class_name: str = "CompressedGraphModule"):
        super().__init__(root, graph, class_name)
        self.compression_table = table
        self.last_stats: runtime.RuntimeStats | None = None
        self.measure_errors = False   # set for one forward: a drift check (see runtime.compressing)

    def __call__(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return super().__call__(*args, **kwargs)
        with runtime.compressing(self.compression_table, self.measure_errors) as stats:
            out = super().__call__(*args, **kwargs)
        self.last_stats = stats
        return out


def compression_table(plan: Plan, compile_codecs: bool = False) -> dict:
    """``{(node, ordinal): runtime.Planned}`` for every codec assignment of ``plan``; with
    ``compile_codecs`` each codec runs as compiled kernels (:class:`CompiledCodec`)."""
    table = {}
    renamed: dict[str, str] = {}
    for a in plan.assignments:
        if a.codec == RECOMPUTE:
            continue
        codec = get_codec(a.codec, **dict(a.options), **({"epsilon": a.epsilon} if a.epsilon is not None else {}))
        # not compiled: narrow's range check reads the data; an ε-mode transform's sizes come from it
        if compile_codecs and getattr(codec, "traceable", True) and getattr(codec, "target_epsilon", None) is None:
            codec = CompiledCodec(codec)
        planned = runtime.Planned(codec, tuple(a.shape), getattr(torch, a.dtype))
        table[(a.node, a.ordinal)] = planned
        for key in a.saved_by:   # another save of the storage: if it runs first, it packs it
            table.setdefault(tuple(key), planned)
        # a save of it as a view of another shape (F.linear's 2-D input): it packs the storage
        # where the planned save does not run in the forward (recomputed in backward), else the
        # storage is packed already and the view reads it back
        view = runtime.Planned(planned.codec, None, planned.dtype)
        for key in a.viewed_by:
            table.setdefault(tuple(key), view)
    return table


def _wrap_in_recompute(gm: torch.fx.GraphModule, graph: torch.fx.Graph, names: tuple[str, ...],
                       held: tuple[str, ...], packed: tuple = (), renamed: dict | None = None,
                       one_node: bool = False) -> None:
    """Replace the run of nodes ``names`` by one call that recomputes them in backward::

        y = f(x); z = g(y)    →    recompute_z = Recomputed(segment)(x); z = recompute_z[0]

    ``segment`` is a GraphModule of those nodes (sharing ``gm``'s attributes); it is called
    where the last of them was (every node in between reads nothing they make: see
    :mod:`actcompile.passes.segments`); its outputs are the values read after it. ``held``
    names the placeholders it reads that the forward mutates (buffers): copied for the recomputation.
    ``packed``: ``(node read, saving node, ordinal)`` of arguments kept packed as that save is.
    ``renamed`` maps a node an earlier wrap replaced to the node standing for it now (updated here).
    ``one_node``: the plan runs it as one autograd node (:mod:`actcompile.recompute_node`), where
    the graph's example values agree that it may; else through ``torch.utils.checkpoint``.
    """
    renamed = {} if renamed is None else renamed
    held = {renamed.get(name, name) for name in held}
    packed = tuple((renamed.get(name, name), node, ordinal) for name, node, ordinal in packed)
    nodes_by_name = {n.name: n for n in graph.nodes}
    nodes = [nodes_by_name[name] for name in names]
    inside = set(nodes)
    outside = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    sub = torch.fx.Graph()
    env = {a: sub.placeholder(a.name) for a in outside}
    for a in outside:
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    results = [n for n in nodes if any(u not in inside for u in n.users)]
    sub.output(tuple(env[n] for n in results))
    sub.lint()
    segment = torch.fx.GraphModule(gm, sub, class_name=f"Segment_{names[0]}")
    positions = tuple(k for k, a in enumerate(outside) if a.name in held)
    keys = {name: (node, ordinal) for name, node, ordinal in packed}
    packed_positions = tuple((k, keys[a.name]) for k, a in enumerate(outside) if a.name in keys)
    differentiable = tuple(_requires_grad(n) for n in results)
    recomputed = runtime.Recomputed(segment, positions, packed_positions,
                                    one_node=one_node and _may_run_as_one_node(gm, nodes, outside, results),
                                    differentiable=differentiable if None not in differentiable else None)
    with graph.inserting_after(nodes[-1]):
        call = graph.call_function(recomputed, tuple(outside))
        call.meta["val"] = tuple(n.meta.get("val", n.meta.get("example_value")) for n in results)
        with graph.inserting_after(call):
            for k, n in reversed(list(enumerate(results))):
                out = graph.call_function(operator.getitem, (call, k))
                out.meta = dict(n.meta)
                renamed[n.name] = out.name
                n.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)


def _example(node: torch.fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _requires_grad(node: torch.fx.Node) -> bool | None:
    """Does the tensor ``node`` returns require grad (``None``: not a single tensor, or unknown)?"""
    value = _example(node)
    return value.requires_grad if isinstance(value, torch.Tensor) else None


def _may_run_as_one_node(gm: torch.fx.GraphModule, nodes, outside, results) -> bool:
    """May the run be one autograd node (:mod:`actcompile.recompute_node`)? Not where it reads a
    tensor that requires grad from a module attribute (its gradient would flow only through
    arguments), and not where a result may share storage with an argument (a custom Function's
    output viewing its input refuses later in-place writes): both known only from Dynamo's
    example values; without them, checkpoint's per-op nodes are kept."""
    for n in nodes:
        if n.op == "get_attr":
            value = getattr(gm, str(n.target), None)
            if not isinstance(value, torch.Tensor) or value.requires_grad:
                return False
    storages = set()
    for a in outside:
        for value in tree_leaves(_example(a)) if _example(a) is not None else (None,):
            if value is None:
                return False
            if isinstance(value, torch.Tensor):
                storages.add(StorageWeakRef(value.untyped_storage()).cdata)
    for n in results:
        values = tree_leaves(_example(n)) if _example(n) is not None else (None,)
        for value in values:
            if value is None or (isinstance(value, torch.Tensor)
                                 and StorageWeakRef(value.untyped_storage()).cdata in storages):
                return False
    return True


def _read_state_as_plain_checkpoint(graph: torch.fx.Graph) -> None:
    """Run each checkpointed region as a plain checkpoint with its RNG state preserved
    (:func:`runtime.checkpointed_region`), through :class:`runtime.StateReadingCall` where it is
    given module state."""
    checkpoint = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    for node in graph.find_nodes(op="call_function", target=checkpoint) if checkpoint is not None else ():
        state = tuple(i for i, a in enumerate(node.args)
                      if isinstance(a, torch.fx.Node) and a.op == "placeholder" and meta.is_module_state(a))
        node.target = runtime.StateReadingCall(runtime.checkpointed_region, state) if state \
            else runtime.checkpointed_region


def emit_regions(gm: torch.fx.GraphModule, plan: Plan, compile_codecs: bool = False) -> CompressedGraphModule:
    """A new module running ``gm``'s graph with ``plan``'s compression; ``gm`` is not modified.

    ``compile_codecs``: run the codecs as compiled kernels (see :func:`compression_table`)."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    nodes = {n.name: n for n in graph.nodes}
    named = [name for a in plan.assignments
             for name in (dict(a.options).get("nodes", (a.node,)) if a.codec == RECOMPUTE else (a.node,))]
    missing = [name for name in named if name not in nodes]
    if missing:
        raise ValueError(f"emit_regions: plan names nodes {missing[:5]} that the graph does not have")
    renamed: dict[str, str] = {}
    for a in plan.assignments:
        if a.codec == RECOMPUTE:
            options = dict(a.options)
            _wrap_in_recompute(gm, graph, tuple(options.get("nodes", (a.node,))), tuple(options.get("held", ())),
                               tuple(tuple(p) for p in options.get("packed", ())), renamed,
                               one_node=bool(options.get("one_node", False)))
    _read_state_as_plain_checkpoint(graph)
    nodes = {n.name: n for n in graph.nodes}   # a packed save made inside a recomputed run has no marker:
                                               # the run packs it for itself (runtime.Recomputed)
    # Only marked nodes run under the pack hook (runtime.begin_node): every save of a storage the
    # plan packs must be marked, or it would keep the storage whole: the planned save, the other
    # saves of it (same shape or a view), and saves an earlier graph of the forward may have packed.
    savers = [name for a in plan.assignments if a.codec != RECOMPUTE
              for name in (a.node, *(n for n, _ in a.saved_by), *(n for n, _ in a.viewed_by))]
    savers += [name for s in plan.skipped if s.reason is SkipReason.SHARED
               for name in (s.node, *(n for n, _ in s.saved_by))]
    for name in dict.fromkeys(name for name in savers if name in nodes):
        node = nodes[name]
        with graph.inserting_before(node):
            graph.call_function(runtime.begin_node, (name,))
        with graph.inserting_after(node):
            graph.call_function(runtime.end_node, ())
    graph.lint()
    return CompressedGraphModule(gm, graph, compression_table(plan, compile_codecs), class_name=type(gm).__name__)
