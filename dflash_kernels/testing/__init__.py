"""End-to-end DFlash decoding built only from the package's public ops.

A tiny Qwen3-style target (plain PyTorch, its own paged cache and attention),
a DFlash drafter (``block_attention``, ``fuse_target_features``, ``inject_kv``)
and an engine with plain, chain-speculative (``verify_chain``) and tree
(``build_tree``, ``tree_mask``, ``verify_tree``, ``copy_kv``) loops, and a
trained tiny pair (``load_tiny_pair``, scripts/train_tiny.py). Used by
``tests/test_e2e.py`` and ``examples/dflash_generate.py``; see docs/e2e.md.
"""

from .drafter import DFlashDrafter, DrafterConfig, OracleDrafter
from .engine import Engine, GenerationResult, PageAllocator, slots_of
from .model import TargetConfig, TinyQwen3, make_cos_sin_cache, rms_norm, rope_neox
from .pretrained import decode, encode, load_tiny_pair

__all__ = [
    "DFlashDrafter",
    "DrafterConfig",
    "Engine",
    "GenerationResult",
    "OracleDrafter",
    "PageAllocator",
    "TargetConfig",
    "TinyQwen3",
    "decode",
    "encode",
    "load_tiny_pair",
    "make_cos_sin_cache",
    "rms_norm",
    "rope_neox",
    "slots_of",
]
