"""TWA with the Hugging Face Trainer: a tiny GPT-2 built from a config (no downloads), an ordinary run
whose checkpoint-* folders become the subspace, then a TWA phase with the Trainer's own grouping."""

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import twa_kernels as twa  # noqa: E402
from twa_kernels.integrations.huggingface import AlphasCallback, checkpoint_folders, loss_on  # noqa: E402

VOCAB, LENGTH = 64, 16


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    """Sequences with a learnable rule (each token is the previous plus one), so the loss falls."""

    def __init__(self, count=64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=gen)
        self.ids = (start + torch.arange(LENGTH)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=8, save_steps=2, logging_steps=1,
                learning_rate=5e-3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, save_only_model=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture(scope="module")
def ordinary_run(tmp_path_factory):
    """An ordinary Trainer run that saves checkpoint-2 … checkpoint-8."""
    out = tmp_path_factory.mktemp("ordinary")
    model = tiny_gpt2()
    transformers.Trainer(model=model, args=arguments(out), train_dataset=Tokens()).train()
    return out


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_checkpoint_folders_to_a_twa_phase_with_the_trainers_grouping(ordinary_run, tmp_path):
    folders = checkpoint_folders(ordinary_run)
    assert [os.path.basename(f) for f in folders] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    model = tiny_gpt2(seed=1)  # any initialisation: the subspace is built from the checkpoints
    space = twa.Subspace.from_checkpoints(model, folders, bits=4, progress=False)
    # the recipe: the best fixed merge on a few training batches, ProjectedAdamW's defaults at a constant
    # lr, the average of the second half's iterates at the end
    data = Tokens(seed=1)
    batches = [{k: torch.stack([data[i][k] for i in range(j, j + 8)]) for k in ("input_ids", "labels")}
               for j in (0, 8)]
    start = twa.best_start(model, space, loss_on(batches), progress=False)
    assert start.loss == min(start.losses.values())
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path, weight_decay=0.01, save_steps=4, lr_scheduler_type="constant"),
        train_dataset=data, callbacks=[AlphasCallback()],
        optimizer_cls_and_kwargs=(twa.ProjectedAdamW, {"space": space, "init": start, "average_after": 4}))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, twa.ProjectedAdamW)
    assert opt.holds_average and opt.averaged_steps == 4  # the run ended at the average of steps 5-8
    assert len(opt.param_groups) == 2 and {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}
    assert not torch.equal(opt.beta, torch.zeros_like(opt.beta))
    seen = losses(trainer)
    assert all(math.isfinite(x) for x in seen) and seen[-1] < seen[0]
    with open(tmp_path / "twa_alphas.json") as f:
        record = json.load(f)
    assert record["step"] == 8 and set(record["alphas"]) == set(space.names)
    for alpha in record["alphas"].values():
        assert len(alpha) == 4 and abs(sum(alpha) - 1) < 1e-9
    assert os.path.isfile(tmp_path / "checkpoint-4" / "twa_alphas.json")


def test_an_optimizer_made_before_the_trainer(ordinary_run, tmp_path):
    model = tiny_gpt2(seed=2)
    space = twa.Subspace.from_checkpoints(model, checkpoint_folders(ordinary_run), bits=4, progress=False)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.5, momentum=0.9, init="center", coordinates="paper")
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, max_steps=6), train_dataset=Tokens(seed=2),
                                   optimizers=(opt, None))  # the Trainer then moves the model to its device
    trainer.train()
    assert not torch.equal(opt.beta, torch.zeros_like(opt.beta))
    seen = losses(trainer)
    assert seen[-1] < seen[0]


def test_resume_a_twa_phase_from_a_trainer_checkpoint(ordinary_run, tmp_path):
    """resume_from_checkpoint inside the TWA phase gives the uninterrupted run bit for bit: the Trainer
    loads the weights before it makes the optimizer, so the optimizer is made with init='keep'."""
    folders = checkpoint_folders(ordinary_run)

    def run(out, max_steps, resume=None):
        model = tiny_gpt2(seed=3)
        space = twa.Subspace.from_checkpoints(model, folders, bits=4, progress=False)
        kwargs = {"space": space, "lr": 3e-3, "init": "keep" if resume else "center"}
        # a constant schedule: the interrupted run's first part must not decay towards its own end
        trainer = transformers.Trainer(model=model, args=arguments(out, max_steps=max_steps, save_steps=3,
                                                                   save_only_model=False, lr_scheduler_type="constant"),
                                       train_dataset=Tokens(seed=3),
                                       optimizer_cls_and_kwargs=(twa.ProjectedAdamW, kwargs))
        trainer.train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "first", 3)
    resumed = run(tmp_path / "first", 6, resume=str(tmp_path / "first" / "checkpoint-3"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
