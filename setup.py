"""Build script. The compiled extension (dflash_kernels._C) is added in csrc/;
without a CUDA toolkit this is a pure-Python install (Triton and reference backends)."""

from setuptools import setup

setup()
