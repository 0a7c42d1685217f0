"""The rows family: kernels that read P̃'s row-major packed codes (:mod:`twa_kernels.packing`), the
format it is saved and loaded in, where it lies — no device copy in another layout.

* :mod:`.engine` — :class:`~.engine.KernelTables` (the launch geometry, read by field name by the Triton
  and C++ kernels alike) and :class:`~.engine.RowsEngine` (the affine fold, once for the family);
* :mod:`.triton_kernels` — backend ``triton``;
* :mod:`.extension_engine` — backends ``cpp`` and ``cuda``, on the kernels in ``csrc/rows/``.

The kernel modules are imported by the registry only when their backend is asked for.
"""
