from .adamw import ProjectedAdamW
from .base import ProjectedOptimizer, twa_state
from .schedule import step_decay
from .sgd import ProjectedSGD

__all__ = ["ProjectedAdamW", "ProjectedOptimizer", "ProjectedSGD", "step_decay", "twa_state"]
