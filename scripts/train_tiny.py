"""Train the tiny target / DFlash drafter pair kept in dflash_kernels/testing/checkpoints.

    PYTHONPATH=. python scripts/train_tiny.py            # writes checkpoints/tiny_pair.pt
    PYTHONPATH=. python scripts/train_tiny.py --out /tmp/x.pt

CPU only, one thread, seeded: about two minutes on one core. Two stages:

1. **Target.** A byte-level (ASCII, V = 128; byte 127 is the drafter's mask
   token and never occurs in the text) TinyQwen3 (dflash_kernels/testing/model.py)
   trained as a causal LM on a few CPython standard-library modules (CORPUS
   below: pure-Python files present in every CPython 3 install; the script
   records their sizes and sha256 in the checkpoint, since their text differs
   between Python versions). The math is TinyQwen3's, written densely with
   autograd (``target_forward``); tests/test_tree_decoding.py checks that the
   loaded model's paged forward equals it.
2. **Drafter.** The target decodes greedily from corpus prompts (its own
   text), and a DFlashDrafter (dflash_kernels/testing/drafter.py) learns block
   diffusion on those sequences: for an anchor at position p, the block
   ``[x_p, MASK x (S-1)]`` at positions p..p+S-1 attends (no causal mask) to
   the context K/V injected from the target's captured hidden states at
   positions < p and to its own S keys, and predicts x_{p+1..p+S-1}, the
   target's greedy continuation. The drafter shares the target's embedding and
   LM head (frozen); everything else is trained (``drafter_forward`` is
   draft_logits + fuse_target_features + inject_kv in dense form).

Weights are stored in fp16 (the target is rounded to fp16 before stage 2, so the
drafter learns the continuations of the stored target).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dflash_kernels.testing.model import make_cos_sin_cache  # noqa: E402

# Pure-Python stdlib modules (Lib/<name>) of every CPython 3 release.
CORPUS = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py", "shlex.py",
          "colorsys.py", "queue.py", "glob.py", "keyword.py", "sched.py", "tabnanny.py",
          "calendar.py", "difflib.py")

VOCAB = 128
MASK = 127

TARGET_CFG = dict(vocab_size=VOCAB, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=64, intermediate_size=256, capture_layers=(0, 2), logit_scale=1.0,
                  rope_theta=10000.0, max_position=2048, eps=1e-6, tie_embeddings=False)
DRAFTER_CFG = dict(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256,
                   block_size=16, mask_token_id=MASK, eps=1e-6)


def load_corpus():
    lib = sysconfig.get_paths()["stdlib"]
    parts, meta = [], []
    for name in CORPUS:
        with open(os.path.join(lib, name), "rb") as f:
            raw = f.read()
        meta.append((name, len(raw), hashlib.sha256(raw).hexdigest()))
        parts.append(raw)
    data = torch.tensor(list(b"\n".join(parts)), dtype=torch.int64)
    data = torch.where(data < MASK, data, torch.full_like(data, ord("?")))
    return data, meta


def encode(text: str):
    return [c if c < MASK else ord("?") for c in text.encode("ascii", "replace")]


# ----------------------------------------------------------------------------
# Dense forms of the models (the same math as the paged ones).
# ----------------------------------------------------------------------------

def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, cs):
    """x [..., T, heads, D] at pos [T] or [..., T] (neox halves)."""
    half = cs.shape[1] // 2
    c = cs[pos]
    cos, sin = c[..., None, :half], c[..., None, half:]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def target_init(gen):
    c = TARGET_CFG
    H, D, Hq, Hkv, I = c["hidden_size"], c["head_dim"], c["num_heads"], c["num_kv_heads"], c["intermediate_size"]

    def lin(o, i, s=1.0):
        return torch.randn(o, i, generator=gen) * (s / math.sqrt(i))

    p = {"embed": torch.randn(VOCAB, H, generator=gen), "final_norm": torch.ones(H),
         "lm_head": lin(VOCAB, H)}
    for li in range(c["num_layers"]):
        p.update({f"{li}.ln1": torch.ones(H), f"{li}.wq": lin(Hq * D, H), f"{li}.wk": lin(Hkv * D, H),
                  f"{li}.wv": lin(Hkv * D, H), f"{li}.wo": lin(H, Hq * D, 0.5),
                  f"{li}.q_norm": torch.ones(D), f"{li}.k_norm": torch.ones(D), f"{li}.ln2": torch.ones(H),
                  f"{li}.w_gate": lin(I, H), f"{li}.w_up": lin(I, H), f"{li}.w_down": lin(H, I, 0.5)})
    return p


def target_forward(p, tokens, cs, cache=None):
    """Causal dense forward: tokens [B, T] -> logits [B, T, V], captured [B, T, H] list.

    ``cache``: None, or a list that holds per-layer (K, V) of earlier tokens
    (appended to in place; the new tokens follow them)."""
    c = TARGET_CFG
    B, T = tokens.shape
    Hq, Hkv, D, eps = c["num_heads"], c["num_kv_heads"], c["head_dim"], c["eps"]
    past = 0 if not cache else cache[0][0].shape[2]
    pos = past + torch.arange(T)
    x = p["embed"][tokens]
    captured = []
    causal = torch.ones(T, past + T, dtype=torch.bool).tril(past)
    for li in range(c["num_layers"]):
        h = rms(x, p[f"{li}.ln1"], eps)
        q = rope(rms((h @ p[f"{li}.wq"].T).view(B, T, Hq, D), p[f"{li}.q_norm"], eps), pos, cs)
        k = rope(rms((h @ p[f"{li}.wk"].T).view(B, T, Hkv, D), p[f"{li}.k_norm"], eps), pos, cs)
        v = (h @ p[f"{li}.wv"].T).view(B, T, Hkv, D)
        g = Hq // Hkv
        k, v = k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
        if cache is not None:
            if len(cache) <= li:
                cache.append((k, v))
            else:
                k, v = torch.cat([cache[li][0], k], 2), torch.cat([cache[li][1], v], 2)
                cache[li] = (k, v)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=causal)
        x = x + o.transpose(1, 2).reshape(B, T, Hq * D) @ p[f"{li}.wo"].T
        h = rms(x, p[f"{li}.ln2"], eps)
        x = x + (F.silu(h @ p[f"{li}.w_gate"].T) * (h @ p[f"{li}.w_up"].T)) @ p[f"{li}.w_down"].T
        if li in c["capture_layers"]:
            captured.append(x)
    return rms(x, p["final_norm"], eps) @ p["lm_head"].T, captured


def drafter_init(gen):
    c, tc = DRAFTER_CFG, TARGET_CFG
    H, D, Hq, Hkv, I = tc["hidden_size"], c["head_dim"], c["num_heads"], c["num_kv_heads"], c["intermediate_size"]
    K = len(tc["capture_layers"])

    def lin(o, i, s=1.0):
        return torch.randn(o, i, generator=gen) * (s / math.sqrt(i))

    p = {"fc_weight": lin(H, K * H), "hidden_norm": torch.ones(H), "final_norm": torch.ones(H)}
    for li in range(c["num_layers"]):
        p.update({f"{li}.wk": lin(Hkv * D, H), f"{li}.wv": lin(Hkv * D, H), f"{li}.k_norm": torch.ones(D),
                  f"{li}.q_norm": torch.ones(D), f"{li}.wq": lin(Hq * D, H), f"{li}.wo": lin(H, Hq * D, 0.5),
                  f"{li}.ln1": torch.ones(H), f"{li}.ln2": torch.ones(H), f"{li}.w_gate": lin(I, H),
                  f"{li}.w_up": lin(I, H), f"{li}.w_down": lin(H, I, 0.5)})
    return p


def drafter_forward(p, embed, lm_head, tokens, feats, anchors, cs):
    """Dense DFlash pass. tokens [B, T] (the sequences), feats: captured [B, T, H]
    list, anchors int64 [A] positions (shared by the batch). Returns logits
    [B, A, S-1, V] for block rows 1..S-1 of every anchor."""
    c = DRAFTER_CFG
    B, T = tokens.shape
    A, S = anchors.shape[0], c["block_size"]
    Hq, Hkv, D, eps = c["num_heads"], c["num_kv_heads"], c["head_dim"], c["eps"]
    g = Hq // Hkv
    ctx = rms(torch.cat(feats, -1) @ p["fc_weight"].T, p["hidden_norm"], eps)      # [B, T, H]
    bpos = anchors[:, None] + torch.arange(S)                                    # [A, S]
    btok = torch.full((B, A, S), MASK, dtype=torch.int64)
    btok[:, :, 0] = tokens[:, anchors]
    x = embed[btok]                                                              # [B, A, S, H]
    cpos = torch.arange(T)
    # Block query (a, i) sees context keys t < anchors[a] and every block key.
    ctx_vis = cpos[None, :] < anchors[:, None]                                   # [A, T]
    for li in range(c["num_layers"]):
        wk, wv = p[f"{li}.wk"], p[f"{li}.wv"]
        kc = rope(rms((ctx @ wk.T).view(B, T, Hkv, D), p[f"{li}.k_norm"], eps), cpos, cs)
        vc = (ctx @ wv.T).view(B, T, Hkv, D)
        h = rms(x, p[f"{li}.ln1"], eps)
        q = rope(rms((h @ p[f"{li}.wq"].T).view(B, A, S, Hq, D), p[f"{li}.q_norm"], eps), bpos, cs)
        kb = rope(rms((h @ wk.T).view(B, A, S, Hkv, D), p[f"{li}.k_norm"], eps), bpos, cs)
        vb = (h @ wv.T).view(B, A, S, Hkv, D)
        qg = q.view(B, A, S, Hkv, g, D)
        sc = torch.einsum("baskgd,btkd->bakgst", qg, kc) * D ** -0.5
        sc = sc.masked_fill(~ctx_vis[None, :, None, None, None, :], float("-inf"))
        sb = torch.einsum("baskgd,bajkd->bakgsj", qg, kb) * D ** -0.5
        pr = torch.softmax(torch.cat([sc, sb], -1), -1)
        o = torch.einsum("bakgst,btkd->baskgd", pr[..., :T], vc) + \
            torch.einsum("bakgsj,bajkd->baskgd", pr[..., T:], vb)
        x = x + o.reshape(B, A, S, Hq * D) @ p[f"{li}.wo"].T
        h = rms(x, p[f"{li}.ln2"], eps)
        x = x + (F.silu(h @ p[f"{li}.w_gate"].T) * (h @ p[f"{li}.w_up"].T)) @ p[f"{li}.w_down"].T
    return rms(x[:, :, 1:], p["final_norm"], eps) @ lm_head.T


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def _fp16_round(p):
    return {k: v.detach().half().float() for k, v in p.items()}


def _adam(params, steps, lr, wd=0.0):
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.95), weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    return opt, sched


def _step(opt, sched, loss, p):
    """One clipped Adam step on the loss (both trainings)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
    opt.step()
    sched.step()


def train_target(data, cs, steps, batch, seq, gen, log):
    p = target_init(gen)
    for v in p.values():
        v.requires_grad_(True)
    opt, sched = _adam(p, steps, 3e-3, wd=0.01)
    for s in range(steps):
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        idx = start[:, None] + torch.arange(seq + 1)
        chunk = data[idx]
        logits, _ = target_forward(p, chunk[:, :-1], cs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        _step(opt, sched, loss, p)
        if s % 50 == 0 or s == steps - 1:
            log(f"target step {s:4d} loss {loss.item():.3f} ({loss.item() / math.log(2):.2f} bits/byte)")
    return _fp16_round(p)


@torch.no_grad()
def greedy_sequences(p, data, cs, num, prompt_len, total, gen):
    """``num`` sequences: a corpus prompt of ``prompt_len`` bytes, then the target's greedy text."""
    start = torch.randint(0, data.numel() - prompt_len, (num,), generator=gen)
    seq = data[start[:, None] + torch.arange(prompt_len)]
    cache = []
    logits, _ = target_forward(p, seq, cs, cache)
    while seq.shape[1] < total:
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits, _ = target_forward(p, nxt, cs, cache)
    return seq


def train_drafter(tp, seqs, cs, steps, batch, anchors_per_seq, min_ctx, gen, log):
    S = DRAFTER_CFG["block_size"]
    p = drafter_init(gen)
    for v in p.values():
        v.requires_grad_(True)
    with torch.no_grad():
        _, feats_all = target_forward(tp, seqs, cs)
    embed, lm_head = tp["embed"], tp["lm_head"]
    opt, sched = _adam(p, steps, 2e-3)
    T = seqs.shape[1]
    # Later block rows matter less (a miss there ends the accepted prefix anyway).
    wpos = torch.exp(-torch.arange(S - 1, dtype=torch.float32) / 8.0)
    wpos = wpos / wpos.mean()
    for s in range(steps):
        rows = torch.randint(0, seqs.shape[0], (batch,), generator=gen)
        anchors = torch.randint(min_ctx, T - S + 1, (anchors_per_seq,), generator=gen)
        toks = seqs[rows]
        feats = [f[rows] for f in feats_all]
        logits = drafter_forward(p, embed, lm_head, toks, feats, anchors, cs)   # [B, A, S-1, V]
        labels = toks[:, anchors[:, None] + torch.arange(1, S)]                 # [B, A, S-1]
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        loss = (ce.view(batch, anchors_per_seq, S - 1) * wpos).mean()
        _step(opt, sched, loss, p)
        if s % 50 == 0 or s == steps - 1:
            with torch.no_grad():
                hit = (logits.argmax(-1) == labels).float()
                # Accepted prefix length of greedy chain drafting, per block.
                acc = hit.cumprod(-1).sum(-1).mean()
            log(f"drafter step {s:4d} loss {loss.item():.3f} greedy accepted drafts/block {acc.item():.2f}")
    return _fp16_round(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "dflash_kernels", "testing", "checkpoints",
                                                  "tiny_pair.pt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-steps", type=int, default=250)
    ap.add_argument("--drafter-steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    data, meta = load_corpus()
    log(f"corpus: {len(CORPUS)} stdlib files, {data.numel()} bytes (Python {sys.version.split()[0]})")
    cs = make_cos_sin_cache(TARGET_CFG["max_position"], TARGET_CFG["head_dim"], TARGET_CFG["rope_theta"])
    tp = train_target(data, cs, args.target_steps, batch=16, seq=128, gen=gen, log=log)
    seqs = greedy_sequences(tp, data, cs, num=64, prompt_len=32, total=192, gen=gen)
    log(f"greedy sequences {tuple(seqs.shape)}; e.g. {bytes(seqs[0, 32:96].tolist())!r}")
    dp = train_drafter(tp, seqs, cs, args.drafter_steps, batch=8, anchors_per_seq=16, min_ctx=8,
                       gen=gen, log=log)
    # Evaluation prompts: corpus snippets kept in the checkpoint, so the tests do
    # not depend on this Python's stdlib text.
    pstart = torch.randint(0, data.numel() - 64, (8,), generator=gen)
    prompts = [bytes(data[int(s):int(s) + 24 + 5 * i].tolist()).decode("ascii") for i, s in enumerate(pstart)]
    ckpt = {
        "format": 1,
        "target_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in TARGET_CFG.items()},
        "drafter_cfg": dict(DRAFTER_CFG),
        "target": {k: v.half() for k, v in tp.items()},
        "drafter": {k: v.half() for k, v in dp.items()},
        "prompts": prompts,
        "meta": {"python": sys.version.split()[0], "torch": str(torch.__version__), "corpus": meta,
                 "seed": args.seed, "target_steps": args.target_steps, "drafter_steps": args.drafter_steps},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(ckpt, args.out)
    log(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
