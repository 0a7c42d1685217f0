import os
import sys

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports the kernels.
# On a machine with a GPU the real kernels run (export TRITON_INTERPRET=0 there).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
assert "twa_kernels.backends.triton_kernels" not in sys.modules

sys.path.insert(0, os.path.dirname(__file__))
