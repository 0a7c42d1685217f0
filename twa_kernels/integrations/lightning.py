"""TWA for Lightning: a callback modelled on Lightning's ``StochasticWeightAveraging``.

    trainer = L.Trainer(max_epochs=10, callbacks=[TWA(start_epoch=5)])

Phase 1 (epochs ``0 … start_epoch − 1``) is the module's own training; at the end of each epoch in
``snapshot_epochs`` (default: all of them) the callback keeps a snapshot of the trainable parameters,
in CPU memory (``storage="memory"``) or as a ``.safetensors`` file in a directory (``storage=path``; the
subspace is then built streaming from those files). At the start of epoch ``start_epoch`` it builds the
subspace from the snapshots, chooses the start (by default :func:`twa_kernels.best_start`: the fixed merge
of the snapshots with the lowest ``training_step`` loss on the first ``start_batches`` training batches,
the module in eval mode), and swaps the module's optimizer (and learning-rate schedulers) for a projected
one, which trains for the remaining epochs, keeping the average of the iterates of the second half of
that phase. When training ends it puts the weights at that average, recomputes BatchNorm statistics over
the training data (``update_bn``) and writes the averaging weights by parameter name.

A Lightning checkpoint taken during the TWA phase resumes it: the callback's state holds the
snapshots (or their paths), the subspace is rebuilt from them (the same subspace, bit for bit), and
the projected optimizer is made before Lightning restores its state, keeping the restored weights.
"""

from __future__ import annotations

import json
import os

import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from ..baselines import update_bn
from ..optim import ProjectedAdamW
from ..start import best_start
from ..subspace import ALPHAS_FILE, Subspace, trainable_parameters


class TWA(Callback):
    """Trainable Weight Averaging over the snapshots of the first ``start_epoch`` epochs.

    Args:
        start_epoch: the (0-based) epoch at which the TWA phase starts; at least two snapshots must
            have been taken before it.
        optimizer: the projected optimizer class (``ProjectedAdamW``, the default, or ``ProjectedSGD``).
        optimizer_kwargs: its hyper-parameters (``lr``, ``momentum``, …); its defaults otherwise.
        start: ``"best"`` (the default: the best fixed merge of the snapshots on ``start_batches`` training
            batches, by the module's ``training_step`` loss), ``"last"``, ``"center"``, or averaging weights.
        start_batches: how many training batches judge the start.
        average: keep the average of the iterates of the second half of the TWA phase, and end there.
        snapshot_epochs: the epochs whose end is snapshotted (default: every epoch before ``start_epoch``).
        storage: ``"memory"`` (CPU copies) or a directory for ``.safetensors`` snapshots.
        subspace_kwargs: for :meth:`Subspace.from_checkpoints` (``bits``, ``decouple``, ``scale``, ``layers``).
        bn_update: recompute BatchNorm statistics when training ends (where the module has BatchNorm).
        alphas_file: file name of the α record written into ``trainer.default_root_dir`` (None: none).
    """

    def __init__(self, start_epoch: int, optimizer=ProjectedAdamW, optimizer_kwargs: dict | None = None, *,
                 snapshot_epochs=None, storage: str | os.PathLike = "memory", subspace_kwargs: dict | None = None,
                 bn_update: bool = True, alphas_file: str | None = ALPHAS_FILE, start="best", start_batches: int = 4,
                 average: bool = True):
        if start_epoch < 2:
            raise ValueError(f"start_epoch must be at least 2 (two snapshots span a subspace), got {start_epoch}")
        self.start_epoch = int(start_epoch)
        self.snapshot_epochs = sorted(set(range(start_epoch) if snapshot_epochs is None else snapshot_epochs))
        if any(e >= start_epoch or e < 0 for e in self.snapshot_epochs) or len(self.snapshot_epochs) < 2:
            raise ValueError(f"snapshot_epochs must hold at least two epochs before start_epoch={start_epoch}, "
                             f"got {self.snapshot_epochs}")
        self.optimizer_cls = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.storage = storage if storage == "memory" else os.fspath(storage)
        self.subspace_kwargs = dict(subspace_kwargs or {})
        self.bn_update = bn_update
        self.alphas_file = alphas_file
        if start_batches < 1:
            raise ValueError(f"start_batches must be at least 1, got {start_batches}")
        self.start, self.start_batches, self.average = start, int(start_batches), bool(average)
        self.chosen = None  # the Start best_start chose
        self.average_after: int | None = None
        self.snapshots: list = []  # state_dicts (memory) or file paths
        self.space: Subspace | None = None
        self.optimizer = None
        self._resume_twa = False

    # ------------------------------------------------------------------ phase 1: snapshots
    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if epoch not in self.snapshot_epochs or self.space is not None:
            return
        params = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(pl_module)}
        if self.storage == "memory":
            self.snapshots.append(params)
            return
        path = os.path.join(self.storage, f"twa_snapshot_epoch{epoch}.safetensors")
        if trainer.is_global_zero:
            os.makedirs(self.storage, exist_ok=True)
            save_file(params, path)
        trainer.strategy.barrier("twa_snapshot")
        self.snapshots.append(path)

    # ------------------------------------------------------------------ phase 2: the subspace
    def _start_loss(self, trainer, pl_module):
        """The module's training_step loss on the first ``start_batches`` training batches (fetched once)."""
        batches = []
        for i, batch in enumerate(trainer.train_dataloader):
            if i == self.start_batches:
                break
            batches.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))

        def evaluate(module):
            was_training = module.training
            module.eval()
            try:
                losses = [module.training_step(batch, i) for i, batch in enumerate(batches)]
            finally:
                module.train(was_training)
            losses = [x["loss"] if isinstance(x, dict) else x for x in losses]
            return float(sum(float(x) for x in losses) / len(losses))

        return evaluate

    def _swap_in(self, trainer, pl_module, init) -> None:
        if len(self.snapshots) < 2:
            raise RuntimeError(f"TWA needs at least two snapshots before epoch {self.start_epoch}, it has "
                               f"{len(self.snapshots)} (were epochs {self.snapshot_epochs} all trained?)")
        self.space = Subspace.from_checkpoints(pl_module, self.snapshots, progress=False,
                                               **dict(self.subspace_kwargs, non_trainable="model"))
        if init == "best":
            self.chosen = init = best_start(pl_module, self.space, self._start_loss(trainer, pl_module), progress=False)
        if self.average and self.average_after is None:
            remaining = trainer.estimated_stepping_batches - trainer.global_step
            self.average_after = max(0, int(remaining) // 2) if remaining != float("inf") else 0
        self.optimizer = self.optimizer_cls(pl_module.parameters(), self.space, init=init,
                                            average_after=self.average_after if self.average else None,
                                            **self.optimizer_kwargs)
        trainer.strategy.optimizers = [self.optimizer]
        trainer.strategy.lr_scheduler_configs.clear()

    def on_fit_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ValueError("the TWA callback works with one optimizer")
        if self._resume_twa:
            # Resumed inside the TWA phase: the weights Lightning restored are the phase's point; the
            # optimizer it is about to restore is the projected one.
            self._swap_in(trainer, pl_module, init="keep")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.start_epoch and self.space is None:
            self._swap_in(trainer, pl_module, init=self.start)

    # ------------------------------------------------------------------ the end
    def on_train_end(self, trainer, pl_module):
        if self.optimizer is None:
            return
        if self.average and self.optimizer.averaged_steps > 0 and not self.optimizer.holds_average:
            self.optimizer.swap_average()
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())
        if self.bn_update and has_bn:
            try:
                update_bn(trainer.train_dataloader, pl_module, device=pl_module.device)
            except NotImplementedError:
                raise RuntimeError("the TWA callback recomputes BatchNorm statistics with the module's forward() over "
                                   "the training data: define forward(), or pass bn_update=False") from None
        alphas = self.optimizer.named_alphas()
        if self.alphas_file and trainer.is_global_zero:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            with open(os.path.join(trainer.default_root_dir, self.alphas_file), "w") as f:
                json.dump({"epoch": trainer.current_epoch, "alphas": alphas}, f, indent=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        return {"snapshots": self.snapshots, "twa_phase": self.space is not None, "average_after": self.average_after}

    def load_state_dict(self, state_dict):
        self.snapshots = list(state_dict["snapshots"])
        self._resume_twa = bool(state_dict["twa_phase"])
        self.average_after = state_dict.get("average_after")
