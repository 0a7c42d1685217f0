"""``twa fit``: a learned merge of Hugging Face checkpoints, the step no merging CLI offers (see :mod:`.run`).

:mod:`.tasks` holds what differs between causal LMs and sequence classifiers, :mod:`.measure` the timing and
memory record, :mod:`.run` the fit itself."""

from .measure import Phases, peak_rss_bytes, reset_peak_rss, timed_step
from .run import INITS, SPLITS, TEXT_SPLITS, fit, fit_causal_lm, greedy, summary
from .tasks import (TASKS, byte_ids, causal_loss, eval_loss, eval_windows, load_model, make_task, random_windows,
                    split_text, tokenize)


def train_step(model, opt, rows, device) -> dict:
    """One causal-LM TWA step on ``rows``, timed phase by phase (see :func:`.measure.timed_step`)."""
    return timed_step(lambda: causal_loss(model, rows), opt, device)


__all__ = ["INITS", "SPLITS", "TASKS", "TEXT_SPLITS", "Phases", "byte_ids", "causal_loss", "eval_loss", "eval_windows",
           "fit", "fit_causal_lm", "greedy", "load_model", "make_task", "peak_rss_bytes", "random_windows", "reset_peak_rss",
           "split_text", "summary", "timed_step", "tokenize", "train_step"]
