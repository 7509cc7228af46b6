"""One plan on every rank: plan on one rank, broadcast it, run it everywhere.

Each rank sees its own batches; planning on each would calibrate every codec on different
values and could pick different codecs and bytes per rank (a rank with a larger plan is
the one that runs out of memory). :func:`share_plan` plans on rank ``src`` and makes every
rank of the group run that very plan (its JSON, through ``broadcast_object_list``), so the
ranks hold the same bytes and make the same gradient error. Gradients, parameters and the
optimizer are then data-parallel as without actcompile: wrap the result in
``DistributedDataParallel`` as usual (``tests/test_distributed.py`` trains that way).

::

    dist.init_process_group("gloo")                # or nccl
    model = actcompile(net, budget=0.25)
    share_plan(model, first_batch)                 # the same plan on every rank
    ddp = DistributedDataParallel(model)

FSDP2 works the same way round: ``fully_shard`` the module ``actcompile`` returned, after
``share_plan`` (measured: 2 ranks, gloo, the plan's 5 packed tensors packed under DTensor
parameters). Sharding first and wrapping after does not: FSDP2's hooks split the captured
forward into graphs without the convolutions, and ``share_plan``'s planning forward on one
rank would wait for the others' all-gathers, so it refuses a sharded model.
"""

from __future__ import annotations

from actcompile.api import ActCompiledModule
from actcompile.plan import ModelPlan


def share_plan(model: ActCompiledModule, example_inputs, src: int = 0, group=None) -> ModelPlan:
    """Plan ``model`` for ``example_inputs``' signature on global rank ``src`` and apply the same
    plan on every rank of ``group`` (default: the whole world); returns it. Every rank must call
    it, with inputs of the same signature (shapes, dtypes)."""
    import torch.distributed as dist

    if not isinstance(model, ActCompiledModule):
        raise TypeError(f"share_plan needs the module actcompile() returned, got {type(model).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("share_plan needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group); without one, actcompile plans on its own")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # torch without DTensor: nothing can be sharded
        DTensor = ()
    if any(isinstance(p, DTensor) for p in model.parameters()):
        # Its forward all-gathers: a planning forward on rank src alone would wait for the others forever.
        raise RuntimeError("share_plan: the model is already sharded (fully_shard); call actcompile() and share_plan() "
                           "first, then fully_shard() the module actcompile returned")
    here = dist.get_rank()
    signature = model.signature_of(example_inputs)
    message = [None]
    if here == src:
        try:   # an error must reach every rank: the others would wait in the broadcast forever
            message = [("plan", model.plan_for(example_inputs, pin=True).to_json(), signature)]
        except Exception as err:
            message = [("error", f"{type(err).__name__}: {err}", signature)]
    dist.broadcast_object_list(message, src=src, group=group)
    if message[0] is None:
        raise RuntimeError(f"share_plan: rank {here} received no plan from rank {src} (is it in the group?)")
    kind, payload, planned_for = message[0]
    if kind == "error":
        raise RuntimeError(f"share_plan: planning on rank {src} failed: {payload}")
    problem = ""
    if here != src:
        if signature != planned_for:
            problem = (f"rank {here}'s inputs are {signature}, rank {src} planned for {planned_for}: "
                       "every rank must call share_plan with inputs of one shape and dtype")
        else:
            try:
                model.use_plan(ModelPlan.from_json(payload), example_inputs)
            except Exception as err:
                problem = f"rank {here} cannot run the plan: {type(err).__name__}: {err}"
    problems = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)   # every rank fails alike, or none does
    failed = [p for p in problems if p]
    if failed:
        raise RuntimeError(f"share_plan: {failed[0]}")
    return model.plan
