"""Compress what Inductor saves for backward: pack in the forward's epilogue, unpack at first use.

Under ``torch.compile`` the saved-for-backward values are explicit: AOTAutograd's partitioner
splits the joint graph into a forward whose outputs are the user's outputs, then the saved
tensors, then saved symints, and a backward whose placeholders are those saved values (same
names) and then the tangents. :class:`SavedValuePartitioner` runs Inductor's own min-cut
partitioner first (so its recompute choices stand), then, for every saved value the plan
packs, traces the codec's ``pack`` into the forward right after the value is made and its
``unpack`` into the backward right before the value's first use. Only the packed payload
crosses from forward to backward; Inductor fuses the quantizer into the kernel producing the
value and the dequantizer into the one consuming it, and frees each decoded value after its
last use, so decompression is spread over backward instead of happening all at its start
(the saved-tensor-hook route under ``compile`` unpacks everything at once, pytorch#148222).

Before/after, a saved ``relu`` packed by ``mask``::

    forward:  relu = relu(...)            relu = relu(...)
              return (out, relu)          ... pack ops ...; return (out, bits, value)
    backward: (relu, tangent)             (bits, value, tangent)
              threshold_backward(t, relu) ... unpack ops → relu_1; threshold_backward(t, relu_1)

The plan is made here, from the saved values: a :class:`~actcompile.plan.MemoryProfile` of
them (the backward ops that read each become its uses; ``threshold_backward`` is ReLU's),
codec errors measured by running the forward graph on the real example inputs (when the
backend has them), and the same knapsack as the eager back end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import re
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from actcompile.codecs import get_codec
from actcompile.codecs.base import packed_bytes, relative_error
from actcompile.config import Budget, CompileConfig
from actcompile.plan import RECOMPUTE, MemoryProfile, Plan, SavedTensor, TensorKind, Use
from actcompile.passes.policy import choose_plans, smallest_plan_bytes
from actcompile.passes.rules import codec_choices, split_candidates

aten = torch.ops.aten
UNPACK_OF = "actcompile_unpack_of"   # node.meta key on every node an unpack inserted: the saved value's name


# -- what is saved ---------------------------------------------------------------------------
def saved_values(fwd: torch.fx.GraphModule, num_fwd_outputs: int) -> list[torch.fx.Node]:
    """The forward's saved tensors (outputs after the user's, symints excluded), in order."""
    outputs = fwd.graph.output_node().args[0]
    return [n for n in outputs[num_fwd_outputs:]
            if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]


_COMPARISONS = {aten.le.Scalar: "le", aten.lt.Scalar: "lt", aten.ge.Scalar: "ge", aten.gt.Scalar: "gt"}
_OR = {aten.bitwise_or.Tensor, aten.logical_or.default}
COMPARED = "compared"   # a backward compares the value with a constant in a way no mask reproduces


def _comparison(user: torch.fx.Node, placeholder: torch.fx.Node):
    """``(op, constant)`` if ``user`` compares the saved value with a Python number, else ``None``."""
    op = _COMPARISONS.get(user.target)
    if op is None or user.args[0] is not placeholder or not isinstance(user.args[1], (int, float)):
        return None
    return op, float(user.args[1])


def _uses(placeholder: torch.fx.Node) -> tuple[Use, ...]:
    """What the backward ops read of a saved value, in the eager profile's terms where they match.

    Inductor's decompositions turn ReLU-like backwards into comparisons: ``x > c`` or ``x <= c``
    alone is a threshold at ``c`` (ReLU, leaky ReLU: the eager ``ThresholdBackward0``), and
    ``(x <= a) | (x >= b)`` is hardtanh's ``(a, b)`` (ReLU6). A mask is exact for those; any other
    comparison still branches on the value (sign-exact codecs only), but no mask reproduces it.
    """
    uses, compared = [], []
    for user in placeholder.users:
        if user.target is aten.threshold_backward.default and user.args[1] is placeholder:
            uses.append(Use("ThresholdBackward0", (("threshold", float(user.args[2])),)))
        elif (cmp := _comparison(user, placeholder)) is not None:
            compared.append((user, cmp))
        else:
            uses.append(Use(str(user.target), ()))
    ops = sorted(cmp for _, cmp in compared)
    if len(compared) == 1 and ops[0][0] in ("le", "gt"):
        uses.append(Use("ThresholdBackward0", (("threshold", ops[0][1]),)))
    elif (len(compared) == 2 and [op for op, _ in ops] == ["ge", "le"] and ops[1][1] < ops[0][1]
          and all(len(u.users) == 1 and next(iter(u.users)).target in _OR for u, _ in compared)
          and len({next(iter(u.users)) for u, _ in compared}) == 1):   # both or-ed into one mask
        uses.append(Use("HardtanhBackward0", (("min_val", ops[1][1]), ("max_val", ops[0][1]))))
    elif compared:
        uses.append(Use(COMPARED, ()))
    return tuple(uses)


def _is_view(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and getattr(node.target, "is_view", False)


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage ``node`` views (``node`` itself when it is no view), also through
    one piece of a view op that returns several (``split``, ``unbind``: GPT-2's q, k, v)."""
    while True:
        if _is_view(node):
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem and _is_view(node.args[0]):
            node = node.args[0].args[0]
        else:
            return node


def _views_an_input(node: torch.fx.Node) -> bool:
    """Is ``node`` a forward input, or a view of one (``permute(weight)``, which ``mm``'s backward
    saves)? Such a value is a parameter, a buffer or the caller's tensor: held anyway, never lossy."""
    return _base(node).op == "placeholder"


def _user_outputs(fwd: torch.fx.GraphModule, num_fwd_outputs: int) -> dict[torch.fx.Node, int]:
    """The storages the forward returns to the caller (by the node that makes each), with their
    bytes: views of forward inputs excluded (the caller's or the module's own tensors)."""
    roots = {}
    for out in fwd.graph.output_node().args[0][:num_fwd_outputs]:
        if isinstance(out, torch.fx.Node) and isinstance(out.meta.get("val"), torch.Tensor):
            root = _base(out)
            val = root.meta.get("val")
            if root.op != "placeholder" and isinstance(val, torch.Tensor):
                roots[root] = val.untyped_storage().nbytes() if not val.is_sparse else 0
    return roots


def profile_saved(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, num_fwd_outputs: int) -> MemoryProfile:
    """A :class:`MemoryProfile` of the values the forward saves: one tensor each, read by its backward users.

    A saved value that is (a view of) a forward input (a parameter, a buffer, the caller's input)
    is kept: it is held anyway. One that is (a view of) what the forward returns is an output:
    the caller holds it, so packing it would free nothing; returned storages no backward reads
    are the profile's ``output_bytes``. As in the eager back end, both count in the baseline and
    are never packed (DESIGN.md: activation bytes). Two saved views of one activation count
    twice here (safe for the budget, pessimistic for the plan).
    """
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    returned = _user_outputs(fwd, num_fwd_outputs)
    tensors, saved_roots = [], set()
    for index, node in enumerate(saved_values(fwd, num_fwd_outputs)):
        val = node.meta["val"]
        in_backward = placeholders.get(node.name)
        uses = _uses(in_backward) if in_backward is not None else ()
        if _views_an_input(node):
            kind = TensorKind.INPUT
        elif _base(node) in returned:
            kind = TensorKind.OUTPUT
            saved_roots.add(_base(node))
        else:
            kind = TensorKind.ACTIVATION
        tensors.append(SavedTensor(index=index, node=node.name, ordinal=0, shape=tuple(val.shape),
                                   dtype=str(val.dtype).removeprefix("torch."), nbytes=val.numel() * val.element_size(),
                                   kind=kind, uses=uses or (Use("?", ()),), packed_shape=tuple(val.shape)))
    order = tuple(n.name for n in fwd.graph.nodes)
    output_bytes = sum(nbytes for root, nbytes in returned.items() if root not in saved_roots)
    return MemoryProfile(tensors=tuple(tensors), events=(), node_order=order, mode="fake", output_bytes=output_bytes)


def replayable_forward(fwd: torch.fx.GraphModule, num_outputs: int | None = None) -> torch.fx.GraphModule | None:
    """A copy of ``fwd`` that can run again on the same inputs without touching them: the
    writes AOTAutograd keeps in the graph (a BatchNorm's running statistics, ``copy_`` into an
    input) are dropped, so calibrating, probing or checking a graph never updates them twice.
    It returns the first ``num_outputs`` outputs (all if ``None``). ``None`` when the forward
    cannot be replayed: it communicates (a collective would run on this rank alone) or reads the
    result of a write."""
    graph = torch.fx.Graph()
    returned = graph.graph_copy(fwd.graph, {})   # every node but the output, meta shared
    graph.output(tuple(returned if num_outputs is None else returned[:num_outputs]))
    for node in reversed(list(graph.nodes)):
        target = node.target
        if node.op != "call_function":
            continue
        if "c10d" in str(getattr(target, "namespace", "")) or "c10d" in str(target):
            return None
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            if node.users:
                return None
            graph.erase_node(node)
    return torch.fx.GraphModule(fwd, graph)


def calibrate_saved(fwd: torch.fx.GraphModule, num_fwd_outputs: int, real_inputs: Sequence | None,
                    choices: dict) -> dict:
    """Each candidate codec's measured error on the real saved values (forward run on ``real_inputs``),
    each packed in its storage order (:func:`storage_orders`), as the compiled forward packs it.

    Without real inputs (or if the forward cannot run on them), a codec's error is taken as its
    documented bound; the plan then says so through its errors.
    """
    values = {}
    results = {}
    orders = storage_orders(fwd)
    with _real_tensors(), torch.random.fork_rng():
        replay = replayable_forward(fwd) if real_inputs is not None else None
        if replay is not None:
            try:
                outputs = replay(*real_inputs)
                names = [n.name if isinstance(n, torch.fx.Node) else None for n in fwd.graph.output_node().args[0]]
                values = {name: v for name, v in zip(names, outputs) if name is not None}
            except Exception:   # e.g. inputs Dynamo passes differently: fall back to documented errors
                values = {}
        for key, codecs in choices.items():
            x = values.get(key[0])
            if isinstance(x, torch.Tensor) and key[0] in orders:
                x = x.permute(orders[key[0]])
            measured = []
            for codec in codecs:
                if isinstance(x, torch.Tensor):
                    packed = codec.pack(x)
                    measured.append((codec, relative_error(x, codec.unpack(packed)), packed_bytes(packed)))
                else:
                    measured.append((codec, _nominal_error(codec), codec.packed_nbytes(_spec(key, fwd))))
            results[key] = measured
    return results


def _spec(key, fwd):
    from actcompile.codecs.base import TensorSpec

    node = next(n for n in fwd.graph.nodes if n.name == key[0])
    return TensorSpec(tuple(node.meta["val"].shape), node.meta["val"].dtype)


_NOMINAL = {"int8": 0.01, "int4": 0.15, "int2": 0.6, "fp8": 0.05}


def _nominal_error(codec) -> float:
    if codec.epsilon is not None:
        return codec.epsilon
    return _NOMINAL.get(codec.name, 0.0 if codec.name == "mask" else 1.0)


def saved_gradient_shares(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, num_fwd_outputs: int,
                          real_inputs: Sequence, seed: int = 0) -> dict[tuple[str, int], float]:
    """``{(saved value, 0): share}``: how much of the parameter gradient each saved value's error
    can reach (:mod:`actcompile.passes.sensitivity`'s measure, for a compiled graph).

    The backward graph says which gradients a saved value feeds: those of the backward's
    outputs its dataflow reaches (a matmul's saved input reaches its weight's gradient only; an
    elementwise backward's, everything upstream). One probe runs the forward on the real inputs
    and the backward on a random tangent for every differentiable output (the planner does not
    know the loss; the global RNG is left as it was); a parameter is a forward input that is a
    leaf requiring grad, and its gradient is the backward output at its position.

    >>> import torch
    >>> from functorch.compile import aot_function, make_boxed_func
    >>> from torch._functorch.partitioners import default_partition
    >>> _ = torch.manual_seed(0)
    >>> w1, w2 = torch.randn(8, 8, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    >>> graphs = {}
    >>> def partition(joint, inputs, **kw):
    ...     graphs["fwd"], graphs["bwd"] = default_partition(joint, inputs, **kw)
    ...     return graphs["fwd"], graphs["bwd"]
    >>> f = aot_function(lambda w1, w2, x: (torch.tanh(x @ w1) @ w2).sum(), lambda g, _: make_boxed_func(g),
    ...                  partition_fn=partition)
    >>> x = torch.randn(4, 8)
    >>> f(w1, w2, x).backward()
    >>> shares = saved_gradient_shares(graphs["fwd"], graphs["bwd"], 1, [w1, w2, x])
    >>> x_share, tanh_share = shares[("primals_3", 0)], shares[("tanh", 0)]
    >>> round(x_share + tanh_share, 6)   # x reaches w1's gradient only; tanh's output w2's only
    1.0
    >>> 0 < tanh_share < x_share
    True
    """
    probe = _BackwardProbe.of(fwd, bwd, real_inputs, seed)
    if probe is None:
        raise ValueError("the Inductor back end cannot weigh errors by their gradient on a graph that "
                         "communicates (its probe would run a collective on one rank): give budget= with "
                         "error_weighting='tensor'")
    with _real_tensors():
        squared = {i: float(g.double().pow(2).sum()) for i, g in probe.input_gradients(probe.args).items()}
    values, placeholders = probe.values, list(bwd.graph.find_nodes(op="placeholder"))
    total = sum(squared.values())
    position = {}
    for i, out in enumerate(bwd.graph.output_node().args[0]):
        if isinstance(out, torch.fx.Node):
            position.setdefault(out, []).append(i)
    shares = {}
    for ph in placeholders:
        if ph.name not in values or not isinstance(ph.meta.get("val"), torch.Tensor):
            continue
        reached, stack, seen = set(), [ph], {ph}
        while stack:   # the backward nodes this value's dataflow reaches
            node = stack.pop()
            reached.update(position.get(node, ()))
            for user in node.users:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        shares[(ph.name, 0)] = sum(squared.get(i, 0.0) for i in reached) / total if total > 0 else 0.0
    return shares


@contextlib.contextmanager
def _real_tensors():
    """Real computation without grad inside a partitioner (which runs under fake mode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        yield


def _eagerly_runnable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a partition's graph whose ``view`` ops are ``reshape``: Inductor lowers a view
    of any layout, eager ``view`` only of a compatible one (a mask unpacked channels-last,
    passes/branch_masks.py, makes its consumers channels-last)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    return torch.fx.GraphModule(gm, graph)


@dataclasses.dataclass
class _BackwardProbe:
    """One forward of a partition on the real inputs (without grad, the global RNG left as it
    was) and the arguments of its backward: the saved values it made, and a random tangent for
    every differentiable output (the planner does not know the loss)."""

    bwd: torch.fx.GraphModule
    real_inputs: Sequence
    values: dict          # forward output name -> its value
    args: list            # the backward's arguments, in placeholder order

    @classmethod
    def of(cls, fwd, bwd, real_inputs: Sequence, seed: int = 0) -> "_BackwardProbe | None":
        """``None`` if the forward cannot be replayed (:func:`replayable_forward`)."""
        replay = replayable_forward(fwd)
        if replay is None:
            return None
        names = [n.name if isinstance(n, torch.fx.Node) else None for n in fwd.graph.output_node().args[0]]
        generator = torch.Generator().manual_seed(seed)
        with _real_tensors(), torch.random.fork_rng():
            values = dict(zip(names, replay(*real_inputs)))
            args = []
            for ph in bwd.graph.find_nodes(op="placeholder"):
                if ph.name in values:
                    args.append(values[ph.name])
                else:   # a tangent: random, of the output's shape
                    val = ph.meta["val"]
                    args.append(torch.randn(tuple(val.shape), generator=generator).to(val.device, val.dtype))
        return cls(_eagerly_runnable(bwd), real_inputs, values, args)

    def input_gradients(self, args: list, leaves_only: bool = True) -> dict[int, torch.Tensor]:
        """The backward run on ``args``: ``{input position: gradient}`` for each forward input
        requiring grad that is a leaf (a parameter), or any (``leaves_only=False``: also an
        activation from a graph before a break, whose gradient reaches that graph's parameters)."""
        with _real_tensors(), torch.random.fork_rng():
            grads = self.bwd(*args)
        return {i: g for i, (g, x) in enumerate(zip(grads, self.real_inputs))
                if isinstance(g, torch.Tensor) and isinstance(x, torch.Tensor) and x.requires_grad
                and (x.is_leaf or not leaves_only)}


def measured_gradient_error(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, plan: Plan,
                            real_inputs: Sequence | None, seed: int = 0) -> float | None:
    """The relative error ``‖g̃ − g‖ / ‖g‖`` of the gradients of the graph's inputs that require
    grad (parameters, and activations of a graph before a break) when the values ``plan`` packs
    are read back through their codecs, measured on one probe (the forward on the real inputs,
    the backward on a random tangent, once exact and once with each packed value round-tripped
    in its storage order). 0 for a plan that packs nothing; ``None`` when it cannot be measured
    (no real inputs, no input requiring grad, a forward that cannot be replayed).

    This is what a plan does to the gradient, through whatever the backward recomputes from a
    packed value: a partition that recomputes a BatchNorm from an int8 input amplifies that
    input's error past its ε (ResNet-18 at 1/4: five int8 values, summed ε² 1e-4, gradient cosine
    0.9945), where a recomputed attention reads an int8 query at about its ε (GPT-2-small: 0.99997).

    >>> from functorch.compile import aot_function, make_boxed_func
    >>> from torch._functorch.partitioners import default_partition
    >>> from actcompile.plan import Assignment, Region
    >>> _ = torch.manual_seed(0)
    >>> graphs = {}
    >>> def partition(joint, inputs, **kw):
    ...     graphs["fwd"], graphs["bwd"] = default_partition(joint, inputs, **kw)
    ...     return graphs["fwd"], graphs["bwd"]
    >>> w, x = torch.randn(64, 64, requires_grad=True), torch.randn(256, 64)
    >>> f = aot_function(lambda w, x: torch.tanh(x @ w).sum(), lambda g, _: make_boxed_func(g), partition_fn=partition)
    >>> f(w, x).backward()
    >>> saved = [n.name for n in saved_values(graphs["fwd"], 1)]   # x and tanh's output
    >>> def packing(codec):   # every saved value packed by ``codec``
    ...     assignments = tuple(Assignment(name, 0, codec, (), None, 65536, 0, 0.0) for name in saved)
    ...     return Plan(budget_bytes=0, baseline_bytes=0, regions=(Region("r0", codec, None, assignments),), skipped=())
    >>> int8 = measured_gradient_error(graphs["fwd"], graphs["bwd"], packing("int8"), [w, x])
    >>> int4 = measured_gradient_error(graphs["fwd"], graphs["bwd"], packing("int4"), [w, x])
    >>> 0.01 < int8 < 0.05, 0.3 < int4 < 0.6   # 1 - tanh² amplifies the saturated values' error
    (True, True)
    """
    packed = {a.node: codec_of(a) for a in plan.assignments if a.codec != RECOMPUTE}
    if not packed:
        return 0.0
    if real_inputs is None:
        return None
    probe = _BackwardProbe.of(fwd, bwd, real_inputs, seed)
    if probe is None:
        return None
    orders = storage_orders(fwd)
    args = list(probe.args)
    with _real_tensors():
        for i, ph in enumerate(bwd.graph.find_nodes(op="placeholder")):
            codec = packed.get(ph.name)
            if codec is not None and isinstance(args[i], torch.Tensor):
                order = orders.get(ph.name)
                x = args[i] if order is None else args[i].permute(order)
                # as the exact value is laid out (backward's views need it), whatever the codec's layout
                args[i] = torch.empty_like(args[i]).copy_(_in_logical_order(codec.unpack(codec.pack(x)), order))
        exact = probe.input_gradients(probe.args, leaves_only=False)
        lossy = probe.input_gradients(args, leaves_only=False)
        squared = sum(float(g.double().pow(2).sum()) for g in exact.values())
        diff = sum(float((lossy[i].double() - g.double()).pow(2).sum()) for i, g in exact.items())
    return (diff / squared) ** 0.5 if squared > 0 else None


def graph_seconds(gm: torch.fx.GraphModule, config: CompileConfig) -> float:
    """Predicted time of one run of an aten graph (a partition's forward or backward), by the
    eager policy's time model (:func:`~actcompile.passes.policy.predicted_seconds`): each op's
    FLOPs (``torch.utils.flop_counter``'s formulas, on the shapes in ``meta["val"]``) and the
    bytes it writes; views write nothing. Used to price what a partition recomputes.

    >>> g = torch.fx.symbolic_trace(lambda a, b: torch.ops.aten.mm.default(a, b))
    >>> for node, shape in zip(g.graph.nodes, [(64, 64), (64, 64), (64, 64)]):
    ...     node.meta["val"] = torch.empty(shape, device="meta")
    >>> cfg = CompileConfig(Budget(fraction=0.5), flops_per_second=1e9, bytes_per_second=1e9)
    >>> round(graph_seconds(g, cfg) * 1e6, 1)   # 2·64³ FLOPs, 16 KiB written and read back, in µs
    557.1
    """
    from torch.utils.flop_counter import flop_registry

    from actcompile.passes.policy import predicted_seconds

    def val(a):
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    total = 0.0
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "is_view", False):
            continue
        out = node.meta.get("val")
        formula = flop_registry.get(getattr(node.target, "overloadpacket", None))
        flops = 0
        if formula is not None:
            args, kwargs = torch.utils._pytree.tree_map(val, (node.args, node.kwargs))
            try:
                flops = formula(*args, **kwargs, out_val=out)
            except Exception:   # a formula that wants what the metadata lacks: priced by its bytes alone
                flops = 0
        written = sum(t.nbytes for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        total += predicted_seconds(flops, written, config)
    return total


def plan_saved(fwd, bwd, num_fwd_outputs: int, config: CompileConfig, real_inputs,
               share: Callable[[int], int]) -> tuple[Plan, int]:
    """The plan for one compiled graph's saved values, keeping at most ``share(baseline_bytes)``
    bytes (its part of the budget the forward's graphs share, see
    :class:`~actcompile.compile_backend.ForwardBudget`), and the least bytes any plan of it keeps.
    A graph that cannot be brought to its share is planned to that least.
    """
    profile, config, calibration = _planning_problem(fwd, bwd, num_fwd_outputs, config, real_inputs)
    shares = None
    if config.error_weighting == "gradient" or config.tolerance is not None:
        if real_inputs is None:
            raise ValueError("the Inductor back end needs the real example inputs to weigh errors by their "
                             "gradient (error_weighting='gradient' or tolerance=): Dynamo gave fake ones")
        shares = saved_gradient_shares(fwd, bwd, num_fwd_outputs, real_inputs)
    least = smallest_plan_bytes(profile, config, calibration)
    if config.tolerance is None:   # else the tolerance decides the bytes, graph by graph
        allowed = max(1, share(profile.baseline_bytes), least)
        config = dataclasses.replace(config, budget=Budget(bytes=allowed))
    return choose_plans([profile], config, [calibration], shares=[shares])[0], least


def _planning_problem(fwd, bwd, num_fwd_outputs: int, config: CompileConfig, real_inputs):
    profile = profile_saved(fwd, bwd, num_fwd_outputs)
    candidates, _ = split_candidates(profile, config)
    orders = storage_orders(fwd)
    # Fixed-rate codecs only: a compiled graph's shapes are fixed when it is traced, and a
    # variable-rate codec's payload size (DCT's cut, the wavelet's kept coefficients) is the data's.
    choices = {(t.node, 0): [_rows_as_groups(codec, _storage_shape(t.shape, orders.get(t.node)))
                             for codec in codec_choices(t, config)
                             if codec.fixed_rate and getattr(codec, "traceable", True)] for t in candidates}
    choices = {k: v for k, v in choices.items() if v}
    calibration = calibrate_saved(fwd, num_fwd_outputs, real_inputs, choices)
    return profile, _no_recompute(config), calibration


def _storage_shape(shape: tuple[int, ...], order: tuple[int, ...] | None) -> tuple[int, ...]:
    return shape if order is None else tuple(shape[d] for d in order)


ROW_GROUP = (64, 4096)   # a row of storage used as a quantizer group when its length is in this range


def _rows_as_groups(codec, shape: tuple[int, ...]):
    """``codec`` with its quantization groups made of whole trailing dims of the storage
    (e.g. one pixel's channels, channels-last), where that gives a group of 64–4096 elements.

    A group that ends where a dim ends has its scale at an index affine in the loop variables
    of every kernel reading the value; a fixed 256-element group does not (``c // 256`` across
    a 96-channel row), and Inductor then emits a scalar loop for the backward kernel that
    dequantizes (MobileNetV2 at 1/4: a 5.6 ms kernel, plain compile's version 0.7 ms; the
    backward 70 → 49 ms, plain compile's 45 ms). A group that splits a row is as bad even when
    it divides it: the quantizer's loop runs over groups, and Inductor indexes a value it inlines
    (a GELU recomputed from its matmul) as ``row·(g // k) + (G·g + i) % row``, a scalar loop (a
    small ViT's 1536-wide MLP rows in 256-element groups: 1.33× plain compile's step; as whole
    rows, 0.95×).
    """
    fields = {f.name for f in dataclasses.fields(codec)}
    if "group_size" not in fields:
        return codec
    row = 1
    for size in reversed(shape):
        row *= size
        if row >= ROW_GROUP[0]:
            break
    if not ROW_GROUP[0] <= row <= ROW_GROUP[1] or row % 8:
        return codec
    return dataclasses.replace(codec, group_size=row)


def _no_recompute(config: CompileConfig) -> CompileConfig:
    # Inductor's partitioner already made the recompute choices; ours has no node to re-run here,
    # and there is no autograd graph to reserve heap for.
    return dataclasses.replace(config, recompute=False, reserve_bytes_per_node=0)


# -- the layout Inductor will give each value -------------------------------------------------
def storage_orders(fwd: torch.fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """For each forward value not laid out in its logical order, the dim order of its storage
    (``x.permute(order)`` is contiguous), as Inductor will lower it.

    The partitioned graph's fake values carry eager strides, but Inductor's layout optimization
    stores the 4-D values along convolution chains channels-last (always on CPU with mkldnn). A
    codec flattening ``x.reshape(-1)`` then reads every element across the channel stride and
    writes its payload the same way; packing ``x.permute(order)`` reads the storage in order
    (MobileNetV2 at 1/4, step × plain compile: 1.70 → 1.56; with :func:`_rows_as_groups` 1.16).
    """
    orders = {}
    channels_last = _channels_last_nodes(fwd)
    for node in fwd.graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        if node.name in channels_last and val.dim() == 4:
            order = (0, 2, 3, 1)
        elif val.is_contiguous():
            continue
        else:   # the fake value's own strides
            strides = val.stride()
            order = tuple(sorted(range(val.dim()), key=lambda d: -strides[d]))
        if order != tuple(range(val.dim())):
            orders[node.name] = order
    return orders


def _channels_last_nodes(fwd: torch.fx.GraphModule) -> set[str]:
    """The nodes Inductor's layout optimization makes channels-last (its own heuristics, asked
    directly; an empty set where this torch lacks them)."""
    import types

    from torch._inductor.graph import GraphLowering

    try:
        if not GraphLowering.decide_layout_opt(fwd, is_inference=False):
            return set()
        return {n.name for n in GraphLowering.find_nodes_prefer_channels_last(types.SimpleNamespace(module=fwd))}
    except Exception:   # private Inductor API: a torch that moved it keeps eager's layout assumption
        return set()


def inverse_order(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation undoing ``order``: ``x.permute(order).permute(inverse_order(order))`` is ``x``."""
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return tuple(inverse)


# -- the rewrite -----------------------------------------------------------------------------
def _trace(fn: Callable, args: tuple, fake_mode) -> torch.fx.GraphModule:
    """``fn`` as an ATen graph of ops Inductor lowers (its decompositions), on fake ``args``."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with fake_mode:
        return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="real")(*args)


def _inline(graph: torch.fx.Graph, sub: torch.fx.GraphModule, inputs: list) -> Any:
    """Copy ``sub``'s nodes into ``graph`` at the insertion point; ``sub``'s placeholders take
    ``inputs`` (flattened in order). Returns ``sub``'s output structure with ``graph``'s nodes."""
    env = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"traced codec takes {len(placeholders)} inputs, given {len(inputs)}")
    for ph, value in zip(placeholders, inputs):
        env[ph] = value
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return torch.fx.map_arg(node.args[0], lambda n: env[n])
        if node.op == "get_attr":
            value = getattr(sub, node.target)
            owner = graph.owning_module
            name = f"_actcompile_const_{len([k for k in owner._buffers if k.startswith('_actcompile_const_')])}"
            owner.register_buffer(name, value)
            new = graph.get_attr(name)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        env[node] = new
    raise AssertionError("traced graph has no output")


def crossing_placeholder(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, value: torch.fx.Node,
                         before: torch.fx.Node) -> torch.fx.Node:
    """A backward placeholder (inserted before ``before``) for the forward's new saved value
    ``value``, the two given one name that neither graph uses otherwise: the passes match a saved
    value with its placeholder by name (FX would rename a placeholder whose name the backward
    already uses, and a later pass would read another value's placeholder)."""
    # FX keeps a name ``stem_N`` that no node of the graph ever had as given, and renames any other
    # (a bare stem, or one used before, even by an erased node): pick one free in both graphs.
    fwd_used, bwd_used = fwd.graph._graph_namespace._used_names, bwd.graph._graph_namespace._used_names
    name = value.name
    if not re.fullmatch(r".*_\d+", name) or name in bwd_used:
        stem, i = re.sub(r"_\d+$", "", name), 0
        while (name := f"{stem}_{i}") in fwd_used or name in bwd_used:
            i += 1
    value._rename(name)
    with bwd.graph.inserting_before(before):
        ph = bwd.graph.placeholder(name)
    assert value.name == name == ph.name, (value.name, name, ph.name)
    ph.meta = dict(value.meta)
    return ph


def _first_use(node: torch.fx.Node) -> torch.fx.Node:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


@dataclasses.dataclass(frozen=True)
class PackedValue:
    """Where one saved value's packing landed: its payload outputs, and in the backward (node
    positions) where its unpack starts and where the value is first used."""

    name: str
    codec: str
    payload: tuple[str, ...]
    unpack_at: int
    first_use_at: int


def _copy_op(view: torch.fx.Node) -> tuple:
    """``(target, args, kwargs)`` of a contiguous copy of ``view`` that Inductor keeps. Its
    ``remove_noop_ops`` drops a ``clone`` whose sizes and strides equal its source's, the storage
    offset not compared: a dim-0 ``select`` of a contiguous activation would again be saved as a
    view of all of it. ×1 is exact (-0.0 and NaN included) and no post-grad pass removes it."""
    val = view.meta["val"]
    if not val.is_contiguous():
        return aten.clone.default, (view,), {"memory_format": torch.contiguous_format}
    return aten.mul.Tensor, (view, 1), {}


def _copy_views_kept_of_packed_(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, num_fwd_outputs: int,
                                packed: set[str], fake_mode) -> list[str]:
    """Save a copy of each view the plan keeps of an activation whose other saved views it packs.

    Inductor saves views (``select`` of a fused q/k/v projection) as views: one view kept holds
    the whole activation, though the plan counts only the view's bytes and packs its siblings
    to free the rest. A contiguous copy of the kept view (made in forward, read by backward in
    its place) holds what the plan counts. Left alone where the activation is held anyway (saved
    whole, returned, or an input), the kept views are no smaller than it, or one is bool (×1
    would promote it). Returns the names of the views copied.
    """
    outputs = list(fwd.graph.output_node().args[0])
    returned = _user_outputs(fwd, num_fwd_outputs)
    by_base: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in saved_values(fwd, num_fwd_outputs):
        by_base.setdefault(_base(node), []).append(node)
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    copied = []
    for base, views in by_base.items():
        kept = [v for v in views if v.name not in packed and v.name in placeholders]
        base_val = base.meta.get("val")
        if (base.op == "placeholder" or base in returned or base in views or not kept or len(kept) == len(views)
                or not isinstance(base_val, torch.Tensor)):
            continue
        if any(u.target is aten.as_strided.default for v in kept for u in placeholders[v.name].users):
            continue   # reads the view's strides, which a contiguous copy does not have
        if (sum(v.meta["val"].numel() * v.meta["val"].element_size() for v in kept) >= base_val.untyped_storage().nbytes()
                or any(v.meta["val"].dtype == torch.bool for v in kept)):
            continue
        for view in kept:
            with fwd.graph.inserting_after(view):
                copy = fwd.graph.call_function(*_copy_op(view))
            with fake_mode:
                copy.meta["val"] = copy.target(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in copy.args],
                                               **copy.kwargs)
            outputs[outputs.index(view)] = copy
            in_backward = placeholders[view.name]
            ph = crossing_placeholder(fwd, bwd, copy, before=in_backward)
            in_backward.replace_all_uses_with(ph)
            bwd.graph.erase_node(in_backward)
            copied.append(view.name)
    if copied:
        fwd.graph.output_node().args = (tuple(outputs),)
        for gm in (fwd, bwd):
            gm.graph.lint()
            gm.recompile()
    return copied


def compress_saved_(fwd: torch.fx.GraphModule, bwd: torch.fx.GraphModule, num_fwd_outputs: int, plan: Plan,
                    fake_mode) -> list[PackedValue]:
    """Rewrite ``fwd``/``bwd`` in place so each saved value ``plan`` packs crosses as its payload."""
    chosen = {a.node: a for a in plan.assignments if a.codec != RECOMPUTE}
    if not chosen:
        return []
    _copy_views_kept_of_packed_(fwd, bwd, num_fwd_outputs, set(chosen), fake_mode)
    output = fwd.graph.output_node()
    outputs = list(output.args[0])
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    new_outputs = list(outputs[:num_fwd_outputs])
    orders = storage_orders(fwd)
    report = []
    for node in outputs[num_fwd_outputs:]:
        a = chosen.get(getattr(node, "name", None))
        in_backward = placeholders.get(getattr(node, "name", None))
        if a is None or in_backward is None or not in_backward.users:
            new_outputs.append(node)
            continue
        codec = codec_of(a)
        val = node.meta["val"]
        order = orders.get(node.name)
        pack_gm = _trace(lambda x: codec.pack(x if order is None else x.permute(order)), (val,), fake_mode)
        with fwd.graph.inserting_before(node.next):   # (inserting_after would reverse the copied nodes)
            payload = _inline(fwd.graph, pack_gm, [node])
        leaves, spec = tree_flatten(payload)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.fx.Node)]
        new_outputs.extend(tensors)
        # the backward: a placeholder per payload tensor, then the unpack before the first use
        inputs = [crossing_placeholder(fwd, bwd, t, before=in_backward) for t in tensors]
        unpack_gm = _trace(lambda *tensor_args: _in_logical_order(codec.unpack(_refill(spec, leaves, tensor_args)),
                                                                  order),
                           tuple(t.meta["val"] for t in tensors), fake_mode)
        first_use = _first_use(in_backward)
        before = set(bwd.graph.nodes)
        with bwd.graph.inserting_before(first_use):
            decoded = _inline(bwd.graph, unpack_gm, inputs)
        for n in set(bwd.graph.nodes) - before:
            n.meta[UNPACK_OF] = node.name
        in_backward.replace_all_uses_with(decoded)
        bwd.graph.erase_node(in_backward)
        report.append((node.name, a.codec, tuple(t.name for t in tensors), decoded))
    output.args = (tuple(new_outputs),)
    for gm in (fwd, bwd):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    position = {n: i for i, n in enumerate(bwd.graph.nodes)}
    return [PackedValue(name, codec, payload,
                        min(position[n] for n in bwd.graph.nodes if n.meta.get(UNPACK_OF) == name),
                        min(position[u] for u in decoded.users))
            for name, codec, payload, decoded in report]


def codec_of(assignment):
    """The codec object an assignment of a compiled graph's plan names (its options and ε)."""
    a = assignment
    return get_codec(a.codec, **dict(a.options), **({"epsilon": a.epsilon} if a.epsilon is not None else {}))


def _in_logical_order(x: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    return x if order is None else x.permute(inverse_order(order))


def _refill(spec, leaves, tensors):
    """The payload structure with its tensor leaves replaced, in order, by ``tensors``."""
    it = iter(tensors)
    return tree_unflatten([next(it) if isinstance(leaf, torch.fx.Node) else leaf for leaf in leaves], spec)


def _fake_mode_of(fwd: torch.fx.GraphModule):
    for node in fwd.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.fake_tensor.FakeTensor):
            return val.fake_mode
    raise RuntimeError("the forward graph carries no FakeTensor values")



# -- drift checks ----------------------------------------------------------------------------
@dataclasses.dataclass
class SavedValueCheck:
    """What a drift check of one compiled graph needs: its plan, a copy of its forward from
    before the rewrite that returns only the user's outputs (so each saved value is freed after
    its last use in the forward, not held to the end), and the storage order of each value.
    ``inputs`` is how many inputs the forward takes (Dynamo's graph inputs, parameters lifted)."""

    plan: Plan
    forward: torch.fx.GraphModule
    orders: dict[str, tuple[int, ...]]
    inputs: int

    @classmethod
    def of(cls, fwd: torch.fx.GraphModule, num_fwd_outputs: int, plan: Plan) -> "SavedValueCheck | None":
        """The check of ``fwd`` (before its rewrite), or ``None`` if it cannot be replayed."""
        forward = replayable_forward(fwd, num_fwd_outputs)
        if forward is None:
            return None
        return cls(plan, forward, storage_orders(fwd), len(fwd.graph.find_nodes(op="placeholder")))

    def measure(self, inputs: Sequence) -> dict[tuple[str, int], float]:
        """Each checked packed value's codec error, on this forward's real values (one eager
        forward of the graph without grad, the global RNG left as it was). Masks exact by their
        use are right whatever the values and are not measured; a value that is not finite
        (an overflow is the forward's news, not the codec's) is skipped."""
        checked = {a.node: codec_of(a) for a in self.plan.assignments
                   if a.codec != RECOMPUTE and not a.exact_by_use and not dict(a.options).get("predicate_only")}
        if not checked:
            return {}
        if len(inputs) != self.inputs:
            raise ValueError(f"the compiled graph was called with {len(inputs)} inputs, its forward takes {self.inputs}")
        run = _MeasuringRun(self.forward, checked, self.orders)
        with torch.no_grad(), torch.random.fork_rng():
            run.run(*inputs)
        return run.errors


class _MeasuringRun(torch.fx.Interpreter):
    """Runs a forward graph, measuring the codec error of chosen values as they are made."""

    def __init__(self, gm: torch.fx.GraphModule, codecs: dict, orders: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.codecs, self.orders, self.errors = codecs, orders, {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        codec = self.codecs.get(n.name)
        if codec is not None and isinstance(value, torch.Tensor) and bool(torch.isfinite(value).all()):
            x = value.permute(self.orders[n.name]) if n.name in self.orders else value
            self.errors[(n.name, 0)] = relative_error(x, codec.unpack(codec.pack(x)))
        return value if n.users else None   # a value only the backward read: measured, then dropped
