"""The Lightning TWA callback on CPU with a tiny module: snapshots, the swap to the projected optimizer,
BatchNorm statistics at the end, and a resume from a checkpoint taken inside the TWA phase."""

import json
import os

import pytest
import torch

L = pytest.importorskip("lightning")

import twa_kernels as twa  # noqa: E402
from twa_kernels.integrations.lightning import TWA  # noqa: E402
from backend_cases import point_bound  # noqa: E402


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


class BetaRecorder(L.Callback):
    """β after every step of the TWA phase."""

    def __init__(self):
        self.betas = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        if isinstance(opt, twa.ProjectedSGD):
            self.betas.append(opt.beta)


def loader():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=gen)
    y = (x[:, :1] * 2 - x[:, 1:2]) + 0.1 * torch.randn(128, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def trainer(root, max_epochs, callbacks, **kw):
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=str(root), accelerator="cpu",
                     devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     deterministic=True, **kw)


def fit(root, storage="memory", max_epochs=6, ckpt_path=None, extra=()):
    torch.manual_seed(0)
    module = TinyRegression()
    callback = TWA(start_epoch=3, optimizer=twa.ProjectedSGD, optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
                   storage=storage, subspace_kwargs={"bits": 4})
    trainer(root, max_epochs, [callback, *extra]).fit(module, loader(), ckpt_path=ckpt_path)
    return module, callback


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_twa_phase_after_the_snapshots(tmp_path, storage):
    store = "memory" if storage == "memory" else tmp_path / "snapshots"
    recorder = BetaRecorder()
    module, callback = fit(tmp_path, store, extra=(recorder,))
    assert len(callback.snapshots) == 3 and callback.space.n == 3
    if storage == "disk":
        assert sorted(os.listdir(store)) == [f"twa_snapshot_epoch{e}.safetensors" for e in range(3)]
    opt = callback.optimizer
    assert isinstance(opt, twa.ProjectedSGD) and not torch.equal(opt.beta, torch.zeros_like(opt.beta))
    # the phase started at the best of the snapshots' fixed merges on the first training batches
    start = callback.chosen
    assert start is not None and start.loss == min(start.losses.values()) and len(start.losses) >= 3
    # the trained weights are w̄ + P̃β: the point of the subspace, not of the phase-1 optimizer, within the
    # rounding of the fp32 in-place moves that took them there
    params = torch.cat([p.detach().reshape(-1) for _, p in twa.subspace.trainable_parameters(module)])
    space = callback.space
    exact = torch.cat([space.center[s].double() + space.dense(l).double() @ opt.beta[l].double()
                       for l, s in enumerate(space.layer_slices())])
    # 3 TWA epochs of 8 batches, then the move to the average of the second half's iterates
    betas = recorder.betas + [opt.beta]
    assert len(betas) == 3 * 8 + 1 and opt.holds_average and opt.average_after == 12
    assert torch.allclose(opt.beta, torch.stack(recorder.betas[12:]).mean(0), rtol=0, atol=1e-6)
    bound = point_bound([space.dense(l) for l in range(space.num_layers)], betas, exact)
    assert torch.all((params.double() - exact).abs() <= bound)
    with open(tmp_path / "twa_alphas.json") as f:
        record = json.load(f)
    assert set(record["alphas"]) == set(callback.space.names)


def test_batchnorm_statistics_are_recomputed_at_the_end(tmp_path):
    module, _ = fit(tmp_path)
    bn = module.net[1]
    expected = TinyRegression()
    expected.load_state_dict(module.state_dict())
    twa.update_bn(loader(), expected)
    assert torch.allclose(bn.running_mean, expected.net[1].running_mean)
    assert torch.allclose(bn.running_var, expected.net[1].running_var)


def test_resume_from_a_checkpoint_inside_the_twa_phase(tmp_path):
    whole, _ = fit(tmp_path / "whole")
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)

    class Interrupt(L.Callback):  # the same run, stopped inside the TWA phase (epochs 3, 4 done)
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 4:
                trainer.should_stop = True

    fit(tmp_path / "first", extra=[saver, Interrupt()])
    ckpt = next(p for p in os.listdir(tmp_path / "ckpts") if p.startswith("epoch=4"))
    resumed, callback = fit(tmp_path / "second", ckpt_path=str(tmp_path / "ckpts" / ckpt))
    assert isinstance(callback.optimizer, twa.ProjectedSGD) and callback.optimizer.holds_average
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
