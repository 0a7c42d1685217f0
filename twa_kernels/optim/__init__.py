from .adamw import ProjectedAdamW
from .base import ProjectedOptimizer
from .sgd import ProjectedSGD

__all__ = ["ProjectedAdamW", "ProjectedOptimizer", "ProjectedSGD"]
