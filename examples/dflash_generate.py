"""DFlash speculative decoding end to end: plain vs chain DFlash vs tree DFlash.

    python examples/dflash_generate.py                      # trained tiny pair, CPU, reference ops
    python examples/dflash_generate.py --budgets 16 32 64 128
    python examples/dflash_generate.py --modes mixed --temperature 1.0   # odd requests sampled
    python examples/dflash_generate.py --pair random        # random-weight target and drafter
    python examples/dflash_generate.py --pair random --drafter oracle   # drafts copied from a plain run
    python examples/dflash_generate.py --backend triton     # Triton (interpreter without a GPU: slow)

The trained pair is dflash_kernels/testing/checkpoints/tiny_pair.pt
(scripts/train_tiny.py): a byte-level target trained on a few CPython stdlib
modules and a DFlash drafter trained on the target's greedy text. Prints one
row per decoding mode: tokens per step (accepted drafts + the bonus), target
forward passes per generated token, nodes the target verifies per step, and
whether every request's output equals plain decoding with the same keyed
sampler. See docs/e2e.md and docs/tree.md.
"""

import argparse
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="reference", choices=["reference", "triton", "cuda", "auto"],
                   help="backend of the package's ops ('cuda' falls back per op where it has none)")
    p.add_argument("--pair", default="trained", choices=["trained", "random"],
                   help="trained: the checkpointed tiny pair; random: random weights")
    p.add_argument("--drafter", default="dflash", choices=["dflash", "oracle"],
                   help="with --pair random: dflash (random weights) or oracle (drafts from a plain run)")
    p.add_argument("--batch", type=int, default=8, help="requests (different prompts)")
    p.add_argument("--max-new", type=int, default=64, help="tokens to generate per request")
    p.add_argument("--block-size", type=int, default=16, help="DFlash block size S")
    p.add_argument("--budgets", type=int, nargs="*", default=[16, 32, 64], help="tree node budgets N")
    p.add_argument("--top-k", type=int, default=8, help="tree candidates per depth")
    p.add_argument("--modes", nargs="*", default=["greedy", "sampled"], choices=["greedy", "sampled", "mixed"],
                   help="one table each: all greedy, all sampled at --temperature, or odd requests sampled")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled requests")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="per-step lines of the chain run")
    p.add_argument("--show", action="store_true", help="print the generated text of each request")
    return p.parse_args()


def run_mode(args, torch, Engine, OracleDrafter, target, drafter, backend, prompts, temps, seeds, label):
    B, S = len(prompts), args.block_size
    t0 = time.time()
    plain = Engine(target, None, page_size=16, backend=backend).generate_plain(prompts, args.max_new, temps, seeds)
    rows = [("plain", 1, plain, time.time() - t0)]
    if args.drafter == "oracle" and args.pair == "random":
        drafter = OracleDrafter(target, drafter.cfg, plain.tokens)

    step = [0]

    def on_step(accept_len, out_tokens, active):
        # Reading device values back: only for printing.
        step[0] += 1
        a, toks, act = accept_len.tolist(), out_tokens.tolist(), active.tolist()
        parts = [f"r{b}: +{a[b] + 1}" if act[b] else f"r{b}: done" for b in range(B)]
        print(f"chain step {step[0]:3d} | " + " ".join(parts))

    t0 = time.time()
    chain = Engine(target, drafter, page_size=16, backend=backend).generate_speculative(
        prompts, args.max_new, temps, seeds, on_step=on_step if args.verbose else None)
    rows.append((f"chain DFlash (S {S})", S, chain, time.time() - t0))
    if args.drafter != "oracle":
        for n in args.budgets:
            t0 = time.time()
            tree = Engine(target, drafter, page_size=16, backend=backend).generate_tree(
                prompts, args.max_new, temps, seeds, num_nodes=n, top_k=args.top_k)
            rows.append((f"tree DFlash (N {n}, top-{args.top_k})", n, tree, time.time() - t0))

    p_tok = plain.tokens.cpu()
    print(f"\n{label}:")
    print("| decoding | nodes verified/step | accepted/step | tokens/step | target passes/token "
          "| same as plain | CPU s |")
    print("|---|---|---|---|---|---|---|")
    all_same, chain_acc = True, None
    for name, nodes, res, secs in rows:
        toks = res.tokens.cpu()
        same = bool((toks == p_tok).all())
        all_same &= same
        new = args.max_new - 1  # tokens after the prefill's first one
        if name == "plain":
            acc, passes = 0.0, 1.0
        else:
            hist = res.accept_lens.cpu()
            active = hist >= 0
            acc = hist.clamp(min=0)[active].sum().item() / active.sum().item()
            # One target pass per step serves the whole batch.
            passes = res.steps / new
        extra = ""
        if name.startswith("chain"):
            chain_acc = acc
        elif name.startswith("tree") and chain_acc is not None:
            # Acceptance gained over the chain, and per extra verified node.
            extra = f" ({acc - chain_acc:+.2f} vs chain"
            extra += f", {(acc - chain_acc) / (nodes - S):+.3f}/extra node)" if nodes > S else ")"
        print(f"| {name} | {nodes} | {acc:.2f}{extra} | {acc + 1:.2f} | {passes:.3f} | {same} | {secs:.1f} |")
    note = ("(accepted/step: accepted drafts per active request-step; tokens/step = accepted + the "
            f"bonus; target passes/token: target forward passes of the batch per generated token after "
            f"the first, {args.max_new - 1} per request; same as plain: every request's tokens equal "
            "plain decoding with the same keyed sampler)")
    return plain, all_same, note


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
    from dflash_kernels.testing import (DFlashDrafter, DrafterConfig, Engine, OracleDrafter, TargetConfig,
                                        TinyQwen3, decode, encode, load_tiny_pair)

    ops = ("block_attention", "fuse_target_features", "inject_kv", "verify_chain", "build_tree", "tree_mask",
           "verify_tree", "copy_kv")
    if args.backend == "auto":
        backend = None
    elif args.backend == "cuda":
        backend = {op: ("cuda" if _registry.is_available(op, "cuda", device) else None) for op in ops}
    else:
        backend = args.backend
    chosen = {op: _registry.resolve(op, device, backend.get(op) if isinstance(backend, dict) else backend)
              for op in ops}
    print(f"device {device}; ops run on: " + ", ".join(f"{op}={b}" for op, b in chosen.items()))

    B, S = args.batch, args.block_size
    gen = torch.Generator().manual_seed(args.seed)
    if args.pair == "trained":
        target, drafter, info = load_tiny_pair(device, block_size=S)
        texts = [info.prompts[b % len(info.prompts)] for b in range(B)]
        prompts = [encode(t) for t in texts]
        print(f"trained pair: target {target.cfg.num_layers} layers, H {target.cfg.hidden_size}, "
              f"V {target.cfg.vocab_size} (bytes); drafter {drafter.cfg.num_layers} layer(s), S {S}")
    else:
        target = TinyQwen3(TargetConfig(seed=args.seed), device=device)
        V = target.cfg.vocab_size
        drafter = DFlashDrafter(target, DrafterConfig(block_size=S, mask_token_id=V - 1, seed=args.seed + 1))
        prompts = [torch.randint(0, V - 1, (int(n),), generator=gen).tolist()
                   for n in torch.randint(3, 24, (B,), generator=gen)]
    seeds = torch.randint(0, 2 ** 62, (B,), generator=gen).tolist()
    print(f"{B} requests, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_new} new tokens each")
    modes = {"greedy": [0.0] * B, "sampled": [args.temperature] * B,
             "mixed": [args.temperature if b % 2 else 0.0 for b in range(B)]}
    labels = {"greedy": "greedy", "sampled": f"sampled, T = {args.temperature} (keyed Gumbel-max)",
              "mixed": f"mixed: odd requests T = {args.temperature}, even greedy"}
    all_same, outputs, note = True, {}, ""
    for mode in args.modes:
        plain, same, note = run_mode(args, torch, Engine, OracleDrafter, target, drafter, backend, prompts,
                                     modes[mode], seeds, labels[mode])
        all_same &= same
        outputs[mode] = plain.tokens.cpu()
    print("\n" + note)
    if args.show:
        for mode, toks in outputs.items():
            for b in range(B):
                print(f"--- {mode}, request {b}")
                if args.pair == "trained":
                    print(repr(texts[b]), "->", repr(decode(toks[b].tolist())))
                else:
                    print(prompts[b], "->", toks[b].tolist())
    print("lossless:", all_same)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
