"""dflash_kernels: fused GPU kernels for DFlash block-diffusion speculative decoding.

Public ops (SPEC.md): :func:`block_attention`, :func:`fuse_target_features`,
:func:`inject_kv`, :func:`write_kv`, :func:`verify_chain`. Each runs on the
best backend available for its tensors' device (compiled CUDA, Triton,
PyTorch reference); ``backend=`` or ``DFLASH_KERNELS_BACKEND`` overrides it.
"""

from ._registry import BackendUnavailableError, backends
from .ops import (
    VerifyOutput,
    block_attention,
    fuse_target_features,
    inject_kv,
    verify_chain,
    write_kv,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "VerifyOutput",
    "backends",
    "block_attention",
    "fuse_target_features",
    "inject_kv",
    "verify_chain",
    "write_kv",
]
