"""The trained tiny target / DFlash drafter pair (scripts/train_tiny.py).

``checkpoints/tiny_pair.pt``: a byte-level TinyQwen3 (V = 128, ASCII; byte 127
is the drafter's mask token) trained on a few CPython stdlib modules, and a
DFlashDrafter trained on the target's own greedy continuations. Weights are
fp16 in the file; the target runs in float64 (exactly the stored values), the
drafter in fp16. See docs/e2e.md for what it accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .drafter import DFlashDrafter, DrafterConfig
from .model import TargetConfig, TinyQwen3

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny_pair.pt")


@dataclass
class TinyPairInfo:
    prompts: List[str]      # corpus snippets (ASCII) kept with the weights
    meta: dict              # python / torch versions, corpus files and hashes, steps

    def encode(self, text: str) -> List[int]:
        return encode(text)


def encode(text: str) -> List[int]:
    """ASCII bytes as token ids (non-ASCII -> '?'; id 127 is the mask token)."""
    return [c if c < 127 else ord("?") for c in text.encode("ascii", "replace")]


def decode(ids) -> str:
    return bytes(int(i) if 0 <= int(i) < 127 else ord("?") for i in ids).decode("ascii")


def load_tiny_pair(device="cpu", block_size: Optional[int] = None, path: str = CHECKPOINT,
                   ) -> Tuple[TinyQwen3, DFlashDrafter, TinyPairInfo]:
    """``(target, drafter, info)`` from the checkpoint. ``block_size`` overrides the
    drafter's trained S (16): a DFlash drafter drafts any block size, trained or not."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    tc = dict(ck["target_cfg"])
    tc["capture_layers"] = tuple(tc["capture_layers"])
    target = TinyQwen3(TargetConfig(**tc), device=device)
    t = {k: v.to(target.cfg.dtype).to(target.device) for k, v in ck["target"].items()}
    target.embed, target.lm_head, target.final_norm = t["embed"], t["lm_head"], t["final_norm"]
    for li, layer in enumerate(target.layers):
        for name in layer.__dataclass_fields__:
            setattr(layer, name, t[f"{li}.{name}"])
    dc = dict(ck["drafter_cfg"])
    if block_size is not None:
        dc["block_size"] = int(block_size)
    drafter = DFlashDrafter(target, DrafterConfig(**dc))
    dt, dev = drafter.cfg.dtype, target.device
    d = {k: v.to(dt).to(dev) for k, v in ck["drafter"].items()}
    L = drafter.cfg.num_layers
    drafter.fc_weight, drafter.hidden_norm, drafter.final_norm = d["fc_weight"], d["hidden_norm"], d["final_norm"]
    drafter.kv_weight = torch.stack([torch.stack([d[f"{li}.wk"], d[f"{li}.wv"]]) for li in range(L)])
    drafter.k_norm = torch.stack([d[f"{li}.k_norm"] for li in range(L)])
    drafter.q_norm = torch.stack([d[f"{li}.q_norm"] for li in range(L)])
    for name in ("wq", "wo", "ln1", "ln2", "w_gate", "w_up", "w_down"):
        setattr(drafter, name, [d[f"{li}.{name}"] for li in range(L)])
    return target, drafter, TinyPairInfo(list(ck["prompts"]), dict(ck["meta"]))
