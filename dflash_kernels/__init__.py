"""dflash_kernels: fused GPU kernels for DFlash block-diffusion speculative decoding.

Public ops (SPEC.md): :func:`block_attention`, :func:`fuse_target_features`,
:func:`inject_kv`, :func:`write_kv`, :func:`verify_chain` (``ops.__all__`` is
the list). Each runs on the best backend that can take the call on its
tensors' device (compiled CUDA, Triton, PyTorch reference); ``backend=`` or
``DFLASH_KERNELS_BACKEND`` overrides it.
"""

from . import ops as _ops
from ._registry import BackendUnavailableError, backends
from .ops import *  # noqa: F401,F403  (the public ops: ops.__all__)

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "backends", *_ops.__all__]
