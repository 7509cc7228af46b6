"""Where people already train: Hugging Face's Trainer, with the plan in its logs; checkpoints that
load into the plain model."""

import logging

import pytest
import torch

from actcompile import actcompile

transformers = pytest.importorskip("transformers")


def tiny_gpt2(tied: bool):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_trains_inside_the_hf_trainer_with_the_plan_in_its_logs_and_saves_for_the_plain_model(tmp_path, caplog):
    from actcompile.hf import PlanLogCallback

    model = tiny_gpt2(tied=False)   # tied weights: see the next test
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = actcompile(model, budget=0.5)
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, learning_rate=1e-3)
    trainer = transformers.Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[PlanLogCallback()])
    with caplog.at_level(logging.INFO, logger="actcompile"):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    assert all(h["actcompile_planned_mb"] <= h["actcompile_budget_mb"] < h["actcompile_baseline_mb"] for h in logged)
    assert "actcompile plan:" in caplog.text and "before → after" in caplog.text
    assert wrapped.last_stats is not None and wrapped.plan.assignments   # it trained compressed

    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    plain = tiny_gpt2(tied=False)
    plain.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")), strict=True)
    trained = model.state_dict()
    assert all(torch.equal(plain.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(before[k], trained[k]) for k in trained)   # the saved weights are the trained ones


def test_a_tied_model_saves_through_the_wrapper_with_save_pretrained(tmp_path):
    model = tiny_gpt2(tied=True)
    wrapped = actcompile(model, budget=0.5)
    ids = torch.randint(0, 256, (4, 32))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.grad)
    wrapped.save_pretrained(str(tmp_path))   # the model's own method: the wrapper shares its parameters
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
