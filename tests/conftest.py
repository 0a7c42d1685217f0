import os
import sys

# Under pytest-xdist (-n N) each worker takes its share of the cores for its thread pools (torch's and
# the cpp backend's OpenMP), and so do the processes its tests start: N workers each running as many
# threads as there are cores spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(share)
    import torch

    torch.set_num_threads(share)

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports the kernels.
# On a machine with a GPU the real kernels run (export TRITON_INTERPRET=0 there).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
assert "twa_kernels.backends.triton_common" not in sys.modules

sys.path.insert(0, os.path.dirname(__file__))
