"""Where people already train: PyTorch Lightning, with the plan in its logs; a Lightning
checkpoint that loads into the plain model."""

import csv
import logging

import pytest
import torch
from torch import nn

from actcompile import actcompile

lightning = pytest.importorskip("lightning")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4))


class Classifier(lightning.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_trains_inside_lightning_with_the_plan_in_its_logs_and_its_checkpoint_loads_into_the_plain_model(
        tmp_path, caplog):
    from actcompile.lightning import PlanLogCallback

    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Classifier(actcompile(model, budget=0.5))
    logger = lightning.pytorch.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                callbacks=[PlanLogCallback()], default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="actcompile"):
        trainer.fit(module, loader)

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("actcompile_planned_mb")]
    assert len(rows) == 4, rows
    assert all(float(r["actcompile_planned_mb"]) <= float(r["actcompile_budget_mb"]) < float(r["actcompile_baseline_mb"])
               for r in rows)
    assert "actcompile plan:" in caplog.text and "before → after" in caplog.text
    assert module.net.last_stats is not None and module.net.plan.assignments   # it trained compressed

    trainer.save_checkpoint(str(tmp_path / "last.ckpt"))
    state = torch.load(str(tmp_path / "last.ckpt"), weights_only=False)["state_dict"]
    plain = small_cnn()
    plain.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    trained = model.state_dict()
    assert all(torch.equal(plain.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(before[k], trained[k]) for k in trained)   # the saved weights are the trained ones
