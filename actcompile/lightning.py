"""PyTorch Lightning integration: the plan in the Trainer's logs.

A module :func:`~actcompile.actcompile` returns is an ``nn.Module`` whose parameters and
``state_dict`` keys are the model's own, so it goes into a ``LightningModule`` as any layer does
and Lightning's checkpoints load into the plain model (the keys under the attribute's name).
:class:`PlanLogCallback` adds the plan to what Lightning logs: after every training batch
``actcompile_planned_mb``, ``actcompile_budget_mb`` and ``actcompile_baseline_mb`` go to
``self.log`` (so to every logger: CSV, TensorBoard, W&B, ...), and the plan's table goes once
to the ``actcompile`` logger (``logging.INFO``).

::

    from actcompile.lightning import PlanLogCallback

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = actcompile(resnet18(), budget=0.25)
        ...

    lightning.Trainer(callbacks=[PlanLogCallback()]).fit(Classifier(), loader)

Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package;
importing it needs one of them, importing ``actcompile`` never does.
"""

from __future__ import annotations

import logging

try:
    from lightning.pytorch import Callback
except ImportError:   # the package's older name
    try:
        from pytorch_lightning import Callback
    except ImportError as err:
        raise ImportError("actcompile.lightning needs PyTorch Lightning: pip install lightning") from err

from actcompile.api import ActCompiledModule

logger = logging.getLogger("actcompile")


class PlanLogCallback(Callback):
    """Logs the plan's bytes after every training batch and its table once (see the module doc).

    With several actcompile modules inside the ``LightningModule`` the numbers add up over them.
    """

    def __init__(self):
        self._table_logged = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        compiled = [m for m in pl_module.modules() if isinstance(m, ActCompiledModule) and m._last is not None]
        if not compiled:   # no actcompile module, or none planned yet
            return
        plans = [m.plan for m in compiled]
        pl_module.log_dict({"actcompile_planned_mb": sum(p.planned_bytes for p in plans) / 1e6,
                            "actcompile_budget_mb": sum(p.budget_bytes for p in plans) / 1e6,
                            "actcompile_baseline_mb": sum(p.baseline_bytes for p in plans) / 1e6},
                           on_step=True, on_epoch=False)
        if not self._table_logged:
            logger.info("actcompile plan:\n%s", "\n\n".join(map(str, plans)))
            self._table_logged = True
