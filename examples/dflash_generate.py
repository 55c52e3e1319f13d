"""DFlash speculative decoding end to end with a tiny random target and drafter.

    python examples/dflash_generate.py                      # CPU, reference ops
    python examples/dflash_generate.py --drafter oracle     # drafts that always agree
    python examples/dflash_generate.py --backend triton     # Triton (interpreter without a GPU)

Prints, per step, the tokens each request committed and how many drafts were
accepted, then the acceptance per request, and checks that the output equals
plain decoding with the same keyed sampler. See docs/e2e.md.
"""

import argparse
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="reference", choices=["reference", "triton", "cuda", "auto"],
                   help="backend of the package's ops ('cuda' falls back per op where it has none)")
    p.add_argument("--steps", type=int, default=None, help="at most this many speculative steps")
    p.add_argument("--batch", type=int, default=4, help="requests (different prompt lengths)")
    p.add_argument("--max-new", type=int, default=32, help="tokens to generate per request")
    p.add_argument("--block-size", type=int, default=16, help="DFlash block size S")
    p.add_argument("--drafter", default="dflash", choices=["dflash", "oracle"],
                   help="dflash: random-weight drafter; oracle: drafts copied from a plain run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    return p.parse_args()


def main():
    args = parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "triton" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede importing the kernels
    if device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: threads only add overhead

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from dflash_kernels import _registry
    from dflash_kernels.testing import DFlashDrafter, DrafterConfig, Engine, OracleDrafter, TargetConfig, TinyQwen3

    ops = ("block_attention", "fuse_target_features", "inject_kv", "verify_chain")
    if args.backend == "auto":
        backend = None
    elif args.backend == "cuda":
        backend = {op: ("cuda" if _registry.is_available(op, "cuda", device) else None) for op in ops}
    else:
        backend = args.backend
    chosen = {op: _registry.resolve(op, device, backend.get(op) if isinstance(backend, dict) else backend)
              for op in ops}
    print(f"device {device}; ops run on: " + ", ".join(f"{op}={b}" for op, b in chosen.items()))

    target = TinyQwen3(TargetConfig(seed=args.seed), device=device)
    V = target.cfg.vocab_size
    dcfg = DrafterConfig(block_size=args.block_size, mask_token_id=V - 1, seed=args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed)
    B = args.batch
    prompts = [torch.randint(0, V - 1, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 24, (B,), generator=gen)]
    temps = [0.0 if b % 2 == 0 else 0.8 for b in range(B)]  # greedy and sampled requests mixed
    seeds = torch.randint(0, 2 ** 62, (B,), generator=gen).tolist()

    t0 = time.time()
    plain = Engine(target, None, page_size=16, backend=backend).generate_plain(prompts, args.max_new, temps, seeds)
    t_plain = time.time() - t0
    if args.drafter == "oracle":
        drafter = OracleDrafter(target, dcfg, plain.tokens)
    else:
        drafter = DFlashDrafter(target, dcfg)

    step = [0]

    def on_step(accept_len, out_tokens, active):
        # Reading device values back: only for printing.
        step[0] += 1
        if args.quiet:
            return
        a, toks, act = accept_len.tolist(), out_tokens.tolist(), active.tolist()
        parts = []
        for b in range(B):
            if not act[b]:
                parts.append(f"r{b}: done")
                continue
            parts.append(f"r{b}: +{a[b] + 1} (acc {a[b]:2d}) {toks[b][:a[b] + 1]}")
        print(f"step {step[0]:3d} | " + " | ".join(parts))

    eng = Engine(target, drafter, page_size=16, backend=backend)
    t0 = time.time()
    spec = eng.generate_speculative(prompts, args.max_new, temps, seeds, max_steps=args.steps, on_step=on_step)
    t_spec = time.time() - t0

    print()
    acc = spec.accepted_per_step().tolist()
    steps_active = (spec.accept_lens >= 0).sum(0).tolist()
    s_tok, p_tok = spec.tokens.cpu(), plain.tokens.cpu()
    all_same = True
    for b in range(B):
        n = int((s_tok[b] >= 0).sum())
        same = bool((s_tok[b, :n] == p_tok[b, :n]).all())
        all_same &= same
        kind = "greedy" if temps[b] <= 0 else f"T={temps[b]}"
        print(f"request {b} ({kind}, prompt {len(prompts[b])} tokens): {n} tokens in {steps_active[b]} steps, "
              f"accepted {acc[b]:.2f} drafts/step ({acc[b] + 1:.2f} tokens/step), "
              f"same as plain decoding: {same}")
    print(f"\nspeculative: {spec.steps} steps, {t_spec:.2f}s; plain: {plain.steps} steps, {t_plain:.2f}s")
    print("lossless:", all_same)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
