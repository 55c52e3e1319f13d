"""``python -m microbench verify --tp N [--tree]`` (or ``python -m microbench.tp --tp N``):
vocab-parallel verify_chain (``--tree``: verify_tree over a binary tree of S node
slots) on N local ranks against the all-gather of the logits.

Per sampling mode: the collectives one call makes, the bytes it all-reduces per
rank, against the bf16 logits all-gather engines do today, both as counted
from the plan (``vocab_parallel.collectives``) at the run's shape and at the
reference shape B 32, S 16, V 152064; then the measured time per call of
ours and of the all-gather alone, and a bit-for-bit check of rank 0's outputs
against the single-device reference on the gathered logits. Ranks are local
processes: gloo on CPU tensors (timings labelled CPU: they measure this
machine's gloo and PyTorch CPU ops, not NVLink), NCCL when N GPUs are present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import List, Optional

MODES = {
    "greedy": dict(),
    "sample": dict(temperature=True),
    "top_k": dict(temperature=True, top_k=True),
    "top_p": dict(temperature=True, top_p=True),
    "top_k+top_p": dict(temperature=True, top_k=True, top_p=True),
    "draft_probs": dict(temperature=True, draft_probs=True),
    "all": dict(temperature=True, top_k=True, top_p=True, draft_probs=True),
}
# verify_tree takes no draft_probs.
TREE_MODES = [m for m, f in MODES.items() if not f.get("draft_probs")]
REF_SHAPE = (32, 16, 152064)


def plan_row(mode: str, B: int, S: int, V: int, world: int, radix_bits: int):
    """(collectives, all-reduced bytes per rank, bf16 all-gather bytes received per rank).

    The same for verify_tree with S node slots (its modes have no draft_probs)."""
    from dflash_kernels import vocab_parallel as vp
    flags = dict(temperature=False, top_k=False, top_p=False, draft_probs=False)
    flags.update(MODES[mode])
    plan = vp.collectives(B, S, radix_bits=radix_bits, **flags)
    gather = B * S * V * 2 * (world - 1) // world
    return len(plan), vp.payload_bytes(plan), gather


def make_inputs(mode: str, B: int, S: int, V: int, seed: int, tree: bool = False):
    """kwargs of one call; ``tree``: verify_tree over the binary tree ``parents[i] = (i-1)//2``."""
    import torch
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * 3
    bt = torch.randint(0, V, (B, S), generator=g)
    if tree:
        par = (torch.arange(S) - 1).div(2, rounding_mode="floor").to(torch.int32)
        bt[:, 1:] = logits[:, par[1:].long()].argmax(-1)    # accept-heavy: the parent's argmax
        kw = dict(logits=logits, tree_tokens=bt, parents=par.expand(B, S).contiguous())
    else:
        bt[:, 1:] = logits[:, :-1].argmax(-1)                # accept-heavy drafts
        kw = dict(logits=logits, block_tokens=bt,
                  num_drafts=torch.full((B,), S - 1, dtype=torch.int32))
    flags = MODES[mode]
    if flags.get("temperature"):
        kw["temperature"] = torch.full((B,), 0.8)
        kw["seeds"] = torch.randint(0, 2 ** 62, (B,), generator=g)
        kw["positions"] = torch.randint(0, 2 ** 20, (B,), generator=g)
    if flags.get("top_k"):
        kw["top_k"] = torch.full((B,), 50, dtype=torch.int32)
    if flags.get("top_p"):
        kw["top_p"] = torch.full((B,), 0.9)
    if flags.get("draft_probs"):
        kw["draft_probs"] = torch.softmax(torch.randn(B, S - 1, V, generator=g), -1)
    return kw


def _rank(rank, world, init_file, conf, out_file):
    import torch
    import torch.distributed as dist
    import dflash_kernels
    from dflash_kernels import vocab_parallel as vp

    import warnings
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated")
    torch.set_num_threads(1)
    vp.RADIX_BITS = conf["radix_bits"]
    cuda = conf["backend"] == "nccl"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(conf["backend"], init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    B, S, V = conf["shape"]
    width = -(-V // (64 * world)) * 64                  # vLLM: a multiple of 64 per partition
    lo = rank * width
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tree = conf["tree"]
    op = dflash_kernels.verify_tree if tree else dflash_kernels.verify_chain
    tensor_args = ("tree_tokens", "parents") if tree else ("block_tokens",)
    rows = []
    try:
        for mode in conf["modes"]:
            kw = make_inputs(mode, B, S, V, conf["seed"], tree)
            full = {k: v.to(dev) for k, v in kw.items()}
            pad = world * width - V
            shard = dict(full)
            shard["logits"] = torch.nn.functional.pad(full["logits"], (0, pad), value=-1e4)[
                ..., lo:lo + width].contiguous()
            if "draft_probs" in full:
                shard["draft_probs"] = torch.nn.functional.pad(full["draft_probs"], (0, pad))[
                    ..., lo:lo + width].contiguous()
            logits, rest = shard.pop("logits"), [shard.pop(n) for n in tensor_args]
            call = lambda: op(logits, *rest, **shard, tp_group=dist.group.WORLD,
                              vocab_start=lo, vocab_size=V)
            res = call()
            ok = True
            if rank == 0:
                want = op(full.pop("logits"), *[full.pop(n) for n in tensor_args], **full,
                          backend="reference")
                ok = all(torch.equal(a, b) for a, b in zip(res, want) if a is not None)
            log = []
            vp.collective_log = log
            call()
            vp.collective_log = None
            send = logits.to(torch.bfloat16).reshape(B * S, width)
            recv = torch.empty((world * B * S, width), dtype=torch.bfloat16, device=dev)
            gather = lambda: dist.all_gather_into_tensor(recv, send)
            times = {}
            for name, fn in (("ours", call), ("gather", gather)):
                fn()
                ts = []
                for _ in range(conf["reps"]):
                    dist.barrier()
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts)
            rows.append(dict(mode=mode, ok=ok, collectives=len(log),
                             bytes=vp.payload_bytes(log), t_ours=times["ours"],
                             t_gather=times["gather"]))
        if rank == 0:
            torch.save(rows, out_file)
    finally:
        dist.destroy_process_group()


def run(world: int, shape, modes: List[str], reps: int, seed: int, radix_bits: int,
        timeout_s: float = 600, tree: bool = False) -> int:
    import torch
    import torch.multiprocessing as mp

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    label = "GPU (NCCL)" if backend == "nccl" else "CPU (gloo, local processes: not GPU figures)"
    B, S, V = shape
    what = f"verify_tree (binary tree, N {S})" if tree else f"verify_chain, S {S}"
    print(f"vocab-parallel {what}, world {world}, {label}; B {B}, V {V}; radix {radix_bits} bits")
    print("\nCounted from the plan (per call, per rank; all-gather = bf16 logits received):")
    print(f"{'mode':<12} {'colls':>5} {'ours @run':>12} {'gather @run':>12} "
          f"{'ours @32x16x152064':>19} {'gather':>12} {'ratio':>7}")
    for mode in modes:
        n, ours, gat = plan_row(mode, B, S, V, world, radix_bits)
        _, ours_r, gat_r = plan_row(mode, *REF_SHAPE, max(world, 2), radix_bits)
        print(f"{mode:<12} {n:>5} {_mb(ours):>12} {_mb(gat):>12} {_mb(ours_r):>19} {_mb(gat_r):>12} "
              f"{gat_r / ours_r:>6.0f}x")
    with tempfile.TemporaryDirectory() as tmp:
        conf = dict(backend=backend, shape=shape, modes=modes, reps=reps, seed=seed,
                    radix_bits=radix_bits, tree=tree)
        out = os.path.join(tmp, "rows.pt")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), conf, out),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        if any(p.exitcode != 0 for p in procs):
            print(f"error: ranks exited with {[p.exitcode for p in procs]}", file=sys.stderr)
            return 1
        rows = torch.load(out)
    print(f"\nMeasured ({label}; median of {reps} calls, ms):")
    print(f"{'mode':<12} {'check':>6} {'colls':>5} {'bytes':>10} {'ours ms':>9} {'gather ms':>10}")
    bad = 0
    for r in rows:
        bad += not r["ok"]
        print(f"{r['mode']:<12} {'ok' if r['ok'] else 'FAIL':>6} {r['collectives']:>5} "
              f"{_mb(r['bytes']):>10} {r['t_ours'] * 1e3:>9.2f} {r['t_gather'] * 1e3:>10.2f}")
    print(f"(ours: the whole {'verify_tree' if tree else 'verify_chain'} call, partials + "
          "collectives + finish; gather: the all_gather_into_tensor alone, before any verification)")
    return 1 if bad else 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main(args=None, argv: Optional[List[str]] = None) -> int:
    """Entry from ``microbench.cli`` (its parsed args: --tp, --batch, --seed, --reps) or argv."""
    p = argparse.ArgumentParser(prog="python -m microbench.tp")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--s", type=int, default=None, help="rows (tree: node slots) per request "
                                                        "(default 16; 8 on CPU)")
    p.add_argument("--v", type=int, default=152064)
    p.add_argument("--modes", default=None, help="default: every mode (--tree: all without "
                                                   "draft_probs)")
    p.add_argument("--tree", action="store_true", help="verify_tree over a binary tree of S slots")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--radix-bits", type=int, default=8, choices=(4, 8))
    p.add_argument("--seed", type=int, default=0)
    if args is None:
        args = p.parse_args(argv)
    else:   # from microbench.cli: fill what it does not parse
        base = p.parse_args([])
        for k, v in vars(base).items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
        if isinstance(args.batch, list):
            args.batch = args.batch[0]
    import torch
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= args.tp
    if args.tp < 1:
        print("--tp: expected N >= 1", file=sys.stderr)
        return 2
    B = args.batch or (32 if gpu else 4)
    S = args.s or (16 if gpu else 8)
    known = TREE_MODES if args.tree else list(MODES)
    modes = args.modes or known
    if isinstance(modes, str):
        modes = modes.split(",")                    # microbench.cli gives a list already
    modes = [m for m in modes if m]
    if any(m not in known for m in modes):
        print(f"--modes: expected some of {', '.join(known)}", file=sys.stderr)
        return 2
    return run(args.tp, (B, S, args.v), modes, args.reps or (20 if gpu else 5), args.seed,
               args.radix_bits, tree=args.tree)


if __name__ == "__main__":
    sys.exit(main())
