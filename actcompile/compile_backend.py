"""The ``torch.compile`` back end: Inductor, with the saved-for-backward values planned and packed.

::

    compiled = torch.compile(model, backend="actcompile", options={"budget": 0.25})
    # or, to inspect the plans afterwards:
    be = actcompile.backend(budget=0.25)
    compiled = torch.compile(model, backend=be)
    loss = compiled(x).sum(); loss.backward()
    print(be.plans[0])                 # one Plan per compiled graph

``"actcompile"`` is registered through the ``torch_dynamo_backends`` entry-point group, so no
import is needed. Each graph Dynamo captures is compiled by Inductor's ``compile_fx`` with a
custom partitioner (:class:`~actcompile.passes.inductor.SavedValuePartitioner`): Inductor's own
min-cut partition first, then the plan over the values it saves, packed in the forward and
unpacked at first use in the backward (see :mod:`actcompile.passes.inductor`). The budget is a
fraction of the bytes Inductor would save for that graph, or bytes per graph. Options are the
same as :func:`actcompile.actcompile`'s and give the same errors.

>>> import torch
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)
...     def forward(self, x):
...         return self.b(torch.tanh(self.a(x)))
>>> be = backend(budget=0.5)
>>> out = torch.compile(Net(), backend=be)(torch.randn(64, 256))
>>> out.sum().backward()
>>> plan = be.plans[0]
>>> plan.planned_bytes <= plan.budget_bytes
True
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from actcompile.config import CompileConfig
from actcompile.plan import Plan


class SavedValuePartitioner(CustomPartitionerFn):
    """Inductor's min-cut partition, then the saved values planned and packed (one graph)."""

    def __init__(self, config: CompileConfig, real_inputs: Sequence | None, plans: list, packed: list):
        self.config, self.real_inputs, self.plans, self.packed = config, real_inputs, plans, packed

    def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        from actcompile.passes.branch_masks import save_branch_masks_
        from actcompile.passes.inductor import _fake_mode_of, compress_saved_, plan_saved
        from actcompile.plan import RECOMPUTE

        fwd, bwd = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        n = kwargs["num_fwd_outputs"]
        placeholders = list(fwd.graph.find_nodes(op="placeholder"))
        real = self.real_inputs if self.real_inputs is not None and len(self.real_inputs) == len(placeholders) else None
        plan = plan_saved(fwd, bwd, n, self.config, real)
        packed = {a.node for a in plan.assignments if a.codec != RECOMPUTE}
        # masks backward would recompute from a packed value: computed exactly in forward instead
        if packed and save_branch_masks_(fwd, bwd, n, packed, _fake_mode_of(fwd)):
            plan = plan_saved(fwd, bwd, n, self.config, real)   # the saved values changed
        self.packed.append(compress_saved_(fwd, bwd, n, plan, _fake_mode_of(fwd)))
        self.plans.append(plan)
        return fwd, bwd

    def uuid(self):
        return None   # the plan depends on the real values: never reuse a cached artifact

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config (which holds this object) for debug repro strings;
        # the real inputs it keeps may be non-leaf tensors, which cannot be deep-copied.
        return self


class ActCompileBackend:
    """A ``torch.compile`` backend object; ``plans`` lists one :class:`Plan` per compiled graph,
    ``packed`` where each graph's packing landed (:class:`~actcompile.passes.inductor.PackedValue`)."""

    def __init__(self, budget, codecs=None, **options):
        from actcompile.api import make_config

        self.config = make_config(budget, codecs, **options)
        self.plans: list[Plan] = []
        self.packed: list[list] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **_):
        from torch._inductor.compile_fx import compile_fx

        real = [x for x in example_inputs]
        if any(isinstance(x, torch._subclasses.fake_tensor.FakeTensor) for x in real):
            real = None
        partitioner = SavedValuePartitioner(self.config, real, self.plans, self.packed)
        # The plan depends on the real values, not only on the graph: no cached artifact may
        # stand in for it (Inductor's FX graph cache and AOTAutograd's cache both key on the graph).
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches={
                "custom_partitioner_fn": partitioner, "fx_graph_cache": False, "fx_graph_remote_cache": False})


def backend(budget, codecs=None, **options) -> ActCompileBackend:
    """A backend for ``torch.compile(model, backend=...)`` with this budget and these options."""
    return ActCompileBackend(budget, codecs, **options)


def registered_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """What ``backend="actcompile"`` runs (the ``torch_dynamo_backends`` entry point)."""
    options = dict(options or {})
    if "budget" not in options:
        raise TypeError("torch.compile(backend='actcompile') needs options={'budget': ...}: a size such as "
                        "'2GB', an int of bytes, or a float in (0, 1] of the bytes Inductor would save")
    return ActCompileBackend(options.pop("budget"), options.pop("codecs", None), **options)(gm, example_inputs)
