"""Triton kernels of specrt, shipped inside the wheel as ``specrt.kernels``.

Import these modules only through :mod:`specrt.ops`; set ``TRITON_INTERPRET=1``
before the first import to run them on CPU tensors.
"""
