"""twa_kernels: Trainable Weight Averaging with fused low-bit projection kernels."""

from .backends import available_backends
from .optim import ProjectedAdamW, ProjectedSGD
from .subspace import Subspace

__version__ = "0.1.0"

__all__ = ["ProjectedAdamW", "ProjectedSGD", "Subspace", "available_backends", "__version__"]
