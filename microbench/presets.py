"""Shape presets: the draft-side shapes of models that have published DFlash drafters.

The attention shape of a DFlash drafter is its target's (the published drafter
configs copy the target's heads, KV heads and head dim), so the numbers below
come from the target's ``config.json`` on the Hugging Face hub; each field
names the repo and the config field it comes from.

Draft layers (``layers``) and captured target layers (``k``, the width of the
``fc`` input is ``k * h``): DFlash drafters have 1 to 8 layers. The z-lab
drafter for Qwen3-8B (``z-lab/Qwen3-8B-DFlash-b16``) captures 5 target layers
(``dflash_config.target_layer_ids`` has 5 entries) and DFlash's
``build_target_layer_ids(num_target_layers, num_draft_layers)`` picks one
target layer per draft layer, hence 5 draft layers. We could not open the
drafters' own config.json files from here, so ``layers = k = 5`` for every
preset is an ASSUMPTION (marked below); override with ``--shape layers=..,k=..``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Tuple

HEAD_DIMS = (64, 128, 256)
CACHE_KINDS = ("auto", "fp8_e4m3", "fp8_e5m2")
LOGITS_KINDS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Shape:
    """One model's draft-side sizes (see the module docstring for units)."""

    name: str
    hq: int            # query heads
    hkv: int           # KV heads
    d: int             # head dim
    h: int             # model width (hidden size)
    v: int             # vocabulary
    layers: int        # draft layers L
    k: int             # captured target layers (fc input width k*h)
    s: int = 16        # block size
    page: int = 16     # paged-cache page size (tokens)
    window: int = 0    # sliding window of the draft attention; 0 = none
    rope_theta: float = 1e6
    cache: str = "auto"    # cache dtype: the activation dtype, or fp8
    logits: str = "fp32"   # dtype of the target logits given to verify_chain

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Shape] = {
    "qwen3-8b": Shape(
        name="qwen3-8b",
        hq=32,         # Qwen/Qwen3-8B config.json: num_attention_heads
        hkv=8,         # Qwen/Qwen3-8B config.json: num_key_value_heads
        d=128,         # Qwen/Qwen3-8B config.json: head_dim
        h=4096,        # Qwen/Qwen3-8B config.json: hidden_size
        v=151936,      # Qwen/Qwen3-8B config.json: vocab_size
        layers=5,      # ASSUMPTION: z-lab/Qwen3-8B-DFlash-b16 num_hidden_layers (see docstring)
        k=5,           # z-lab/Qwen3-8B-DFlash-b16 dflash_config.target_layer_ids (5 entries)
        s=16,          # z-lab/Qwen3-8B-DFlash-b16 block_size ("-b16")
        rope_theta=1e6,  # Qwen/Qwen3-8B config.json: rope_theta
    ),
    "llama3.1-8b": Shape(
        name="llama3.1-8b",
        hq=32,         # meta-llama/Llama-3.1-8B-Instruct config.json: num_attention_heads
        hkv=8,         # meta-llama/Llama-3.1-8B-Instruct config.json: num_key_value_heads
        d=128,         # meta-llama/Llama-3.1-8B-Instruct config.json: hidden_size / num_attention_heads
        h=4096,        # meta-llama/Llama-3.1-8B-Instruct config.json: hidden_size
        v=128256,      # meta-llama/Llama-3.1-8B-Instruct config.json: vocab_size
        layers=5,      # ASSUMPTION (z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat not checked)
        k=5,           # ASSUMPTION, as layers
        s=16,          # block size 16 (the z-lab drafters' default)
        rope_theta=5e5,  # meta-llama/Llama-3.1-8B-Instruct config.json: rope_theta
    ),
    "qwen3-coder-30b-a3b": Shape(
        name="qwen3-coder-30b-a3b",
        hq=32,         # Qwen/Qwen3-Coder-30B-A3B-Instruct config.json: num_attention_heads
        hkv=4,         # Qwen/Qwen3-Coder-30B-A3B-Instruct config.json: num_key_value_heads
        d=128,         # Qwen/Qwen3-Coder-30B-A3B-Instruct config.json: head_dim
        h=2048,        # Qwen/Qwen3-Coder-30B-A3B-Instruct config.json: hidden_size
        v=151936,      # Qwen/Qwen3-Coder-30B-A3B-Instruct config.json: vocab_size
        layers=5,      # ASSUMPTION (z-lab/Qwen3-Coder-30B-A3B-DFlash not checked)
        k=5,           # ASSUMPTION, as layers
        s=16,          # block size 16 (the z-lab drafters' default)
        rope_theta=1e7,  # Qwen/Qwen3-Coder-30B-A3B-Instruct config.json: rope_theta
    ),
    "gpt-oss-20b": Shape(
        name="gpt-oss-20b",
        hq=64,         # openai/gpt-oss-20b config.json: num_attention_heads
        hkv=8,         # openai/gpt-oss-20b config.json: num_key_value_heads
        d=64,          # openai/gpt-oss-20b config.json: head_dim
        h=2880,        # openai/gpt-oss-20b config.json: hidden_size
        v=201088,      # openai/gpt-oss-20b config.json: vocab_size
        layers=5,      # ASSUMPTION (z-lab/gpt-oss-20b-DFlash not checked)
        k=5,           # ASSUMPTION, as layers
        s=16,          # block size 16 (the z-lab drafters' default)
        window=0,      # ASSUMPTION: full draft attention (the target's sliding_window=128 layers are not copied)
        rope_theta=1.5e5,  # openai/gpt-oss-20b config.json: rope_theta
    ),
    # Reduced shapes for CPU runs (the CPU timings say nothing about kernel speed;
    # these exist so that the CPU path runs every op in seconds).
    "cpu-small": Shape(name="cpu-small", hq=8, hkv=2, d=128, h=256, v=4096, layers=2, k=3, s=16),
    "tiny": Shape(name="tiny", hq=4, hkv=2, d=64, h=64, v=1000, layers=2, k=3, s=4, page=4),
}

MODEL_PRESETS = ("qwen3-8b", "llama3.1-8b", "qwen3-coder-30b-a3b", "gpt-oss-20b")

# Default sweeps: (presets, batches, context lengths).
GPU_DEFAULT: Tuple[Tuple[str, ...], List[int], List[int]] = (MODEL_PRESETS, [1, 16, 128], [1024, 8192])
CPU_DEFAULT: Tuple[Tuple[str, ...], List[int], List[int]] = (("cpu-small",), [1, 4], [128, 512])

_INT_KEYS = ("hq", "hkv", "d", "h", "v", "layers", "k", "s", "page", "window")


class ShapeError(ValueError):
    """A bad --shape or --preset value."""


def parse_shape_overrides(text: str) -> Dict[str, object]:
    """``"hq=32,hkv=8,d=128"`` -> ``{"hq": 32, ...}``; raises ShapeError on anything else."""
    out: Dict[str, object] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ShapeError(f"--shape: expected key=value, got {item!r}")
        key, value = (x.strip() for x in item.split("=", 1))
        if key in _INT_KEYS:
            try:
                out[key] = int(value)
            except ValueError:
                raise ShapeError(f"--shape: {key} expects an integer, got {value!r}") from None
        elif key == "rope_theta":
            try:
                out[key] = float(value)
            except ValueError:
                raise ShapeError(f"--shape: rope_theta expects a number, got {value!r}") from None
        elif key in ("cache", "logits", "name"):
            out[key] = value
        else:
            keys = ", ".join(_INT_KEYS + ("rope_theta", "cache", "logits", "name"))
            raise ShapeError(f"--shape: unknown key {key!r}; expected one of {keys}")
    if not out:
        raise ShapeError("--shape: expected at least one key=value")
    return out


def validate(shape: Shape) -> Shape:
    for key in _INT_KEYS:
        value = getattr(shape, key)
        if value < (0 if key == "window" else 1):
            raise ShapeError(f"--shape: {key} must be {'>= 0' if key == 'window' else '>= 1'}, got {value}")
    if shape.hq % shape.hkv:
        raise ShapeError(f"--shape: hq ({shape.hq}) must be a multiple of hkv ({shape.hkv})")
    if shape.d not in HEAD_DIMS:
        raise ShapeError(f"--shape: d must be one of {HEAD_DIMS}, got {shape.d}")
    if shape.s < 2:
        raise ShapeError(f"--shape: s (block size) must be >= 2, got {shape.s}")
    if shape.cache not in CACHE_KINDS:
        raise ShapeError(f"--shape: cache must be one of {CACHE_KINDS}, got {shape.cache!r}")
    if shape.logits not in LOGITS_KINDS:
        raise ShapeError(f"--shape: logits must be one of {LOGITS_KINDS}, got {shape.logits!r}")
    return shape


def resolve(preset: str, overrides: Dict[str, object] | None = None) -> Shape:
    """The preset's Shape with ``overrides`` applied (a custom shape is named ``custom``)."""
    if preset not in PRESETS:
        raise ShapeError(f"--preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    if overrides:
        fields = dict(overrides)
        fields.setdefault("name", f"{preset}+custom")
        shape = dataclasses.replace(shape, **fields)
    return validate(shape)
