"""Hugging Face ``Trainer`` integration: the plan in the Trainer's logs.

A module :func:`~actcompile.actcompile` returns trains inside ``Trainer`` as it is (its
``forward`` carries the model's signature, so the Trainer keeps the dataset columns the model
takes). :class:`PlanLogCallback` adds the plan to what the Trainer logs: at every log step
``actcompile_planned_mb``, ``actcompile_budget_mb`` and ``actcompile_baseline_mb`` join the
loss in ``trainer.state.log_history`` and in what reporters (TensorBoard, W&B, ...) receive,
and the plan's table goes once to the ``actcompile`` logger (``logging.INFO``).

Saving: ``trainer.save_model()`` stores the wrapped model's state dict, whose keys are the
model's own, so it loads into the plain model. A model with tied weights (GPT-2's embedding
and head) cannot go through that path (safetensors refuses shared tensors for any module
that is not a ``PreTrainedModel``); ``wrapped.save_pretrained(path)`` saves the model itself
(the wrapper shares its parameters), which ``from_pretrained`` loads as usual.

::

    from actcompile.hf import PlanLogCallback
    trainer = Trainer(model=actcompile(model, budget=0.25), args=args, train_dataset=data,
                      callbacks=[PlanLogCallback()])

Importing it needs ``transformers``; importing ``actcompile`` never does.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from actcompile.api import ActCompiledModule

logger = logging.getLogger("actcompile")


def _compiled(model) -> ActCompiledModule | None:
    """The actcompile module in what the Trainer holds (itself, or inside a DDP-like ``.module``)."""
    while model is not None and not isinstance(model, ActCompiledModule):
        model = getattr(model, "module", None)
    return model


class PlanLogCallback(TrainerCallback):
    """Logs the plan's bytes at every Trainer log step and its table once (see the module doc)."""

    def __init__(self):
        self._table_logged = False

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        compiled = _compiled(model)
        if compiled is None or compiled._last is None:   # not an actcompile module, or not planned yet
            return
        plan = compiled.plan
        numbers = {"actcompile_planned_mb": plan.planned_bytes / 1e6, "actcompile_budget_mb": plan.budget_bytes / 1e6,
                   "actcompile_baseline_mb": plan.baseline_bytes / 1e6}
        if logs is not None:
            logs.update(numbers)              # what reporters receive
        if state.log_history:
            state.log_history[-1].update(numbers)   # the Trainer stored its copy just before calling us
        if not self._table_logged:
            logger.info("actcompile plan:\n%s", plan)
            self._table_logged = True
