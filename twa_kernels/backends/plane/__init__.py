"""The plane family: kernels that read P̃ in the plane device layout (:mod:`.layout`), permuted from the
canonical row-major codes once, when P̃ goes to a GPU, for coalesced 16-byte loads.

* :mod:`.layout` — the layout (:class:`~.layout.PlaneLayout`) and its launch tables;
* :mod:`.engine` — :class:`~.engine.PlaneEngine`, what both engines share (they fold in their reduce launch);
* :mod:`.triton_kernels` — backend ``triton_plane``;
* :mod:`.cuda_engine` — backend ``cuda_plane``, on the kernels in ``csrc/plane/``.

Both are selectable and not taken by ``"auto"`` until a GPU run has measured them.
"""
