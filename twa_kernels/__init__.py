"""twa_kernels: Trainable Weight Averaging with fused low-bit projection kernels."""

from . import baselines, distributed, testing
from .backends import available_backends, backend_report, format_backend_report
from .baselines import (ema, ema_weights, greedy_selection, greedy_soup, lawa, lawa_weights, swa, update_bn,
                        weighted_mean)
from .decay import DECAY_FAMILIES, decay_merge_weights, decay_of_merge, decay_weights
from .optim import ProjectedAdamW, ProjectedSGD, step_decay
from .start import Start, best_start
from .subspace import Subspace

__version__ = "0.1.0"

__all__ = ["DECAY_FAMILIES", "ProjectedAdamW", "ProjectedSGD", "Start", "Subspace", "available_backends",
           "backend_report", "baselines", "best_start", "decay_merge_weights", "decay_of_merge", "decay_weights",
           "distributed", "ema", "ema_weights", "format_backend_report", "greedy_selection", "greedy_soup", "lawa",
           "lawa_weights", "step_decay", "swa", "testing", "update_bn", "weighted_mean", "__version__"]
