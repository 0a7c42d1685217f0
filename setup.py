"""Builds the optional C++/CUDA extension ``twa_kernels._C`` when torch is importable at build time.

* ``pip install --no-build-isolation -e .`` with torch installed: the CPU (C++/OpenMP) part is built,
  plus the CUDA part when torch was built with CUDA and nvcc is found.
* An isolated build (plain ``pip install .``) sees no torch and ships pure Python; the extension is
  then compiled on first use by :mod:`twa_kernels.backends.extension` and cached.
* ``TWA_NO_EXTENSION=1`` skips it altogether. A failed compile never fails the install.
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("TWA_NO_EXTENSION") != "1":
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        torch = None
    if torch is not None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "twa_kernels", "backends"))
        from extension_sources import extension_kwargs  # noqa: E402  (one list of sources and flags)

        kwargs = extension_kwargs(with_cuda=torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None,
                                  native=os.environ.get("TWA_PORTABLE") != "1", relative=True)
        ext_cls = cpp_extension.CUDAExtension if kwargs.pop("with_cuda") else cpp_extension.CppExtension
        ext_modules = [ext_cls("twa_kernels._C", **kwargs)]

        class BuildExtOptional(cpp_extension.BuildExtension):
            def run(self):
                try:
                    super().run()
                except Exception as err:  # the package works without it (other backends)
                    print(f"warning: twa_kernels C++ extension not built ({err}); it will be "
                          "compiled on first use instead", file=sys.stderr)

        cmdclass = {"build_ext": BuildExtOptional.with_options(no_python_abi_suffix=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
