from .adamw import ProjectedAdamW
from .base import ProjectedOptimizer, twa_state
from .sgd import ProjectedSGD

__all__ = ["ProjectedAdamW", "ProjectedOptimizer", "ProjectedSGD", "twa_state"]
