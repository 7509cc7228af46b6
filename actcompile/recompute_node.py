"""A recomputed run of nodes as one autograd node.

``torch.utils.checkpoint`` (non-reentrant) keeps none of what the run saves, but it runs the
run with grad enabled, so every op of the run still leaves its autograd node (about 1 KB each on
torch 2.14, CPU) until backward: in a recurrence of small tensors (an RNN cell, RWKV's time
loop) those records weigh more than the tensors recomputing frees. :class:`RecomputedRun`
is one ``autograd.Function``: its forward runs the run on detached inputs with grad enabled (the
same kernels an ordinary call picks) under hooks that keep nothing, and returns detached
results, so the run's own nodes die with the forward; its backward restores the RNG and
autocast state, runs the run again with grad and differentiates it with
``torch.autograd.grad``, which works under ``.backward()``, ``torch.autograd.grad`` and
double backward alike.

What it keeps for backward, per argument (``kept``): ``"save"`` through
``ctx.save_for_backward`` (version-checked, and seen by the saved-tensor hooks active around the
call, so a storage an earlier node packed stays packed); a :class:`Packed` object the caller made
(an argument packed by a codec), which is saved in its place, through hooks of this module, so
that autograd still gives its unpacked value the argument's place in the graph (double backward
differentiates through it); or an :class:`Aside` object (a copy of state the forward mutates),
kept beside the node, unversioned.

>>> import torch
>>> w = torch.randn(8, 8, requires_grad=True)
>>> x = torch.randn(4, 8, requires_grad=True)
>>> run = lambda x, w: (torch.tanh(x @ w).sin(),)
>>> (y,) = recompute_as_one_node(run, (x, w))
>>> y.grad_fn.name()
'RecomputedRunBackward'
>>> torch.autograd.grad(y.sum(), w)[0].allclose(torch.autograd.grad(run(x, w)[0].sum(), w)[0])
True
"""

from __future__ import annotations

import weakref

import torch
import torch.utils.checkpoint as checkpoint
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten


class _Dropped:
    __slots__ = ()


def _drop(_t):
    return _Dropped()   # the forward's own autograd graph is thrown away: nothing it saves is kept


def _never(_t):
    raise RuntimeError("actcompile: the forward of a recomputed run was differentiated through its inner graph")


class _RandomState:
    """The CPU generator's state and that of the accelerators the run's tensors are on.

    Consecutive runs that draw no random numbers see the same CPU state: they share one copy
    of it (``previous``'s, where equal), not 5 KB each."""

    def __init__(self, tensors, previous: "_RandomState | None"):
        self.device_type = checkpoint._infer_device_type(*tensors)
        self.devices, self.device_states = checkpoint.get_device_states(*tensors)
        cpu = torch.get_rng_state()
        if previous is not None and previous.cpu.shape == cpu.shape and torch.equal(previous.cpu, cpu):
            cpu = previous.cpu
        self.cpu = cpu

    def restored(self):
        fork = torch.random.fork_rng(devices=self.devices, enabled=True, device_type=self.device_type)
        return _Restored(fork, self)


class _Restored:
    def __init__(self, fork, state: _RandomState):
        self.fork, self.state = fork, state

    def __enter__(self):
        self.fork.__enter__()
        torch.set_rng_state(self.state.cpu)
        if self.state.devices:
            checkpoint.set_device_states(self.state.devices, self.state.device_states, device_type=self.state.device_type)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class Packed:
    """An argument kept in another form: ``decode()`` gives its value back."""

    def __init__(self, kept):
        self.kept = kept

    def decode(self) -> torch.Tensor:
        return self.kept.decode()


class Aside(Packed):
    """A value kept beside the node, not saved: no version check, no place in the graph."""


class _Outer:
    __slots__ = ("payload", "unpack")

    def __init__(self, payload, unpack):
        self.payload, self.unpack = payload, unpack


class _Whole:
    """An argument kept as it is, with the version it had: hooks turn autograd's own check off."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               f"inplace operation: an argument of a recomputed run is at version "
                               f"{self.tensor._version}; expected version {self.version} instead")
        return self.tensor


def _saving_hooks(kept: list):
    """Hooks for the ``save_for_backward`` of :class:`RecomputedRun`: the ``k``-th saved tensor
    is kept as ``kept`` says (the :class:`Packed` object in its place, else as the hooks around
    the call keep it, else itself)."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    order = iter([k for k in kept if not isinstance(k, Aside)])

    def pack(t):
        k = next(order, "save")
        if isinstance(k, Packed):
            return k
        if outer is not None:
            return _Outer(outer[0](t), outer[1])
        return _Whole(t)

    def unpack(payload):
        if isinstance(payload, Packed):
            return payload.decode()
        if isinstance(payload, _Outer):
            return payload.unpack(payload.payload)
        return payload.unpack()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


_last_state = [lambda: None]   # a weak reference to the latest _RandomState: an unchanged CPU state is shared


class RecomputedRun(torch.autograd.Function):
    """See the module doc. ``box`` carries what ``apply`` cannot: the run, the arguments'
    structure and non-tensor leaves, what is kept for each, and the results' structure."""

    @staticmethod
    def forward(ctx, box: dict, *tensors):
        args = _rebuilt(box, tensors)
        inner = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in args]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _never):
            result = box["run"](*tree_unflatten(inner, box["spec"]))
        leaves, box["out_spec"] = tree_flatten(result)
        box["out_tensor"] = [isinstance(v, torch.Tensor) for v in leaves]
        box["out_other"] = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        outputs = tuple(v.detach() for v in leaves if isinstance(v, torch.Tensor))
        ctx.mark_non_differentiable(*(o for o, grad in zip(outputs, _differentiable(box, outputs)) if not grad))
        kept = box["kept"]
        ctx.save_for_backward(*(t for t, k in zip(tensors, kept) if not isinstance(k, Aside)))
        ctx.box = {key: box[key] for key in ("run", "spec", "other", "tensor_at", "kept", "state", "autocast")}
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)   # first: autograd's own error where they were freed
        box = getattr(ctx, "box", None)
        if box is None:
            raise RuntimeError("Trying to backward through a recomputed run a second time: what it keeps was "
                               "freed after the first backward (pass retain_graph=True to keep it)")
        tensors = [k.decode() if isinstance(k, Aside) else next(saved) for k in box["kept"]]
        create_graph = torch.is_grad_enabled()
        # Double backward differentiates the gradients returned here: the recomputation must then
        # start from the saved arguments themselves (which keep their place in the outer graph).
        inputs = [t if create_graph and needed and not isinstance(k, Aside) else t.detach().requires_grad_(needed)
                  for t, needed, k in zip(tensors, ctx.needs_input_grad[1:], box["kept"])]
        device_kwargs, cpu_kwargs = box["autocast"]
        state = box["state"]
        with state.restored(), torch.enable_grad(), \
                torch.amp.autocast(device_type=state.device_type, **device_kwargs), \
                torch.amp.autocast("cpu", **cpu_kwargs):
            result = box["run"](*tree_unflatten(_rebuilt(box, inputs), box["spec"]))
        outputs = [v for v in tree_flatten(result)[0] if isinstance(v, torch.Tensor)]
        # Differentiated from their autograd edges, not the tensors: the recomputed results are
        # freed before the run's backward, which then holds no more than checkpoint's would.
        pairs = [(get_gradient_edge(o), g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        del result, outputs
        wanted = [x for x in inputs if x.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                                         create_graph=create_graph) if pairs and wanted else ())
        del pairs
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            del ctx.box   # as autograd frees saved tensors: the kept arguments go with this backward
        return (None, *(next(found, None) if x.requires_grad else None for x in inputs))


def _rebuilt(box: dict, tensors) -> list:
    """The arguments' leaves: ``tensors`` where the tensors were, the other leaves as they were."""
    leaves = list(box["other"])
    for position, t in zip(box["tensor_at"], tensors):
        leaves[position] = t
    return leaves


def _differentiable(box: dict, outputs) -> list[bool]:
    flags = box.get("differentiable")
    return [(t.is_floating_point() or t.is_complex()) and (flags is None or flags[k])
            for k, t in enumerate(outputs)]


def recompute_as_one_node(run, args: tuple, kept=None, differentiable=None):
    """Call ``run(*args)`` now and again in backward, as one autograd node (see the module doc).

    ``kept[i]`` says what is kept of the ``i``-th tensor leaf of ``args``: ``"save"`` (default),
    a :class:`Packed` or an :class:`Aside` (see the module doc). ``differentiable[k]``: may the ``k``-th tensor
    result require grad (default: if floating). Returns what ``run`` returns."""
    leaves, spec = tree_flatten(tuple(args))
    tensor_at = [k for k, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    tensors = [leaves[k] for k in tensor_at]
    state = _RandomState(tensors, _last_state[0]())
    _last_state[0] = weakref.ref(state)
    box = dict(run=run, spec=spec, other=[None if isinstance(v, torch.Tensor) else v for v in leaves],
               tensor_at=tensor_at, kept=list(kept) if kept is not None else ["save"] * len(tensors),
               state=state, autocast=checkpoint._get_autocast_kwargs(state.device_type),
               differentiable=differentiable)
    with _saving_hooks(box["kept"]):
        outputs = iter(RecomputedRun.apply(box, *tensors))
    results = [next(outputs) if is_tensor else other for is_tensor, other in zip(box["out_tensor"], box["out_other"])]
    return tree_unflatten(results, box["out_spec"])
