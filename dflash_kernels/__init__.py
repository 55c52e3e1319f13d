"""dflash_kernels: fused GPU kernels for DFlash block-diffusion speculative decoding.

Public ops (SPEC.md): :func:`block_attention`, :func:`fuse_target_features`,
:func:`inject_kv`, :func:`write_kv`, :func:`verify_chain`,
:func:`tree_mask`, :func:`verify_tree`, :func:`copy_kv`. Each runs on the
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
from .tree_ops import TreeVerifyOutput, copy_kv, tree_mask, verify_tree

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "TreeVerifyOutput",
    "VerifyOutput",
    "backends",
    "block_attention",
    "copy_kv",
    "fuse_target_features",
    "inject_kv",
    "tree_mask",
    "verify_chain",
    "verify_tree",
    "write_kv",
]
