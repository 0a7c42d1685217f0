"""TWA with the Hugging Face ``Trainer``.

The projected optimizers are ordinary ``torch.optim`` optimizers, so the Trainer takes them as they are:

* ``Trainer(..., optimizer_cls_and_kwargs=(twa.ProjectedAdamW, {"space": space, "lr": 3e-3}))``: the
  Trainer makes the optimizer with its own decay / no-decay grouping (plain tensors, bound by identity
  to the model the subspace was built from) and its own learning-rate schedule;
* ``Trainer(..., optimizers=(opt, None))``: an optimizer made before the Trainer moves the model to its
  device; the first step follows the parameters there.

From an ordinary run to a TWA phase (:func:`checkpoint_folders` lists the run's ``checkpoint-*``
folders in step order; the reader takes them as they are), starting at the best fixed merge of the
checkpoints on a few training batches and ending at the average of the second half's iterates::

    space = twa.Subspace.from_checkpoints(model, checkpoint_folders("out")[:10], bits=4)
    batches = list(itertools.islice(DataLoader(ds, batch_size=8, collate_fn=collator), 4))
    start = twa.best_start(model, space, loss_on(batches))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[AlphasCallback()],
                      optimizer_cls_and_kwargs=(twa.ProjectedAdamW, {"space": space, "init": start,
                                                                      "average_after": args.max_steps // 2}))
    trainer.train()          # ends at the average of the iterates (AlphasCallback swaps it in)
    trainer.save_model()

:class:`AlphasCallback` writes the averaging weights α of every layer, by parameter name, beside each
saved checkpoint and into the output directory at the end of training; when the optimizer keeps an
average of its iterates, it puts the weights there first.
"""

from __future__ import annotations

import json
import os
import re

from transformers import TrainerCallback

from ..optim import ProjectedOptimizer
from ..subspace import ALPHAS_FILE


def checkpoint_folders(output_dir) -> list[str]:
    """The ``checkpoint-<step>`` folders a Trainer run wrote into ``output_dir``, in step order."""
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folders in {output_dir}")
    return [path for _, path in sorted(found)]


def loss_on(batches):
    """``evaluate(model)`` for :func:`twa_kernels.best_start`: the mean ``model(**batch).loss`` over
    ``batches`` (dicts of tensors, as a data collator makes them, with labels), moved to the model's device,
    the model in eval mode."""
    batches = list(batches)
    if not batches:
        raise ValueError("loss_on needs at least one batch")

    def evaluate(model):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            losses = [float(model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}).loss)
                      for b in batches]
        finally:
            model.train(was_training)
        return sum(losses) / len(losses)

    return evaluate


def _projected(optimizer) -> ProjectedOptimizer | None:
    """The projected optimizer under the Trainer's (accelerate wraps it)."""
    while optimizer is not None and not isinstance(optimizer, ProjectedOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class AlphasCallback(TrainerCallback):
    """Writes ``{"step": ..., "alphas": {parameter name: [α_1 … α_n]}}`` (see
    :meth:`twa_kernels.Subspace.named_alphas`) as ``twa_alphas.json`` into every checkpoint folder the
    Trainer saves and into ``output_dir`` when training ends. Every rank computes α (a collective when
    the columns are sharded); the main process writes."""

    def __init__(self, filename: str = ALPHAS_FILE):
        self.filename = filename

    def _write(self, folder, state, optimizer):
        opt = _projected(optimizer)
        if opt is None:
            return
        record = {"step": state.global_step, "alphas": opt.named_alphas()}
        if state.is_world_process_zero:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, self.filename), "w") as f:
                json.dump(record, f, indent=1)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self._write(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        opt = _projected(optimizer)
        if opt is not None and opt.averaged_steps > 0 and not opt.holds_average:
            opt.swap_average()  # the run ends at the average of its iterates
        self._write(args.output_dir, state, optimizer)
