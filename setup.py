"""Builds the optional extension modules when torch is importable at build time.

* ``pip install --no-build-isolation -e .`` with torch installed builds ``twa_kernels._C`` (the ``cpp``
  backend) and, when torch was built with CUDA and nvcc is found, ``twa_kernels._C_cuda`` (the ``cuda``
  backend; with no GPU visible, for ``TORCH_CUDA_ARCH_LIST`` or the default list). Each is built on its
  own: one failing never takes the other down, and neither fails the install.
* An isolated build (plain ``pip install .``) sees no torch and ships pure Python; the modules are then
  compiled on first use by :mod:`twa_kernels.backends.extension` and cached.
* ``TWA_NO_EXTENSION=1`` skips both. ``TWA_PORTABLE=1`` leaves out ``-march=native`` (wheels for other
  machines).

Whatever happens here, ``python -m twa_kernels backends`` says afterwards which backends run and why.
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
        import extension_sources as src  # noqa: E402  (one list of sources and flags)

        ext_modules.append(cpp_extension.CppExtension(
            "twa_kernels." + src.MODULES["cpu"],
            **src.cpu_extension_kwargs(torch.__version__, native=os.environ.get("TWA_PORTABLE") != "1", relative=True)))
        if torch.version.cuda is not None and src.use_cuda_home(cpp_extension, torch.version.cuda) is not None:
            src.ensure_cuda_arch_list(gpu_visible=torch.cuda.is_available())
            ext_modules.append(cpp_extension.CUDAExtension(
                "twa_kernels." + src.MODULES["cuda"], **src.cuda_extension_kwargs(torch.__version__, relative=True)))

        class BuildEachOptional(cpp_extension.BuildExtension):
            def build_extensions(self):
                self._failed = set()
                try:
                    super().build_extensions()
                except Exception as err:
                    # torch checks the toolchain of every extension first (e.g. nvcc's CUDA version against
                    # torch's): a CUDA problem found there must not stop the CPU module.
                    cuda = [ext.name for ext in self.extensions if ext.name.endswith(src.MODULES["cuda"])]
                    if not cuda:
                        raise
                    print(f"warning: {', '.join(cuda)} not built ({type(err).__name__}: {str(err).strip()})",
                          file=sys.stderr)
                    self.extensions = [ext for ext in self.extensions if ext.name not in cuda]
                    super().build_extensions()
                # What failed is dropped, so that an editable install does not look for its file.
                self.extensions = [ext for ext in self.extensions if ext.name not in self._failed]

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as err:  # the package works without it (other backends, compile on first use)
                    self._failed.add(ext.name)
                    print(f"warning: {ext.name} not built ({type(err).__name__}: {err}); it will be compiled "
                          "on first use instead. `python -m twa_kernels backends` says what runs.", file=sys.stderr)

        cmdclass = {"build_ext": BuildEachOptional.with_options(no_python_abi_suffix=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
