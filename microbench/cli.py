"""``python -m microbench [SUITE|all] [options]``, a suite per op: see docs/benchmark.md.

``python -m microbench overhead [options]`` (host time per call) is microbench/overhead.py;
``python -m microbench sass [options]`` (the compile report) is microbench/sass.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from typing import List, Optional

from . import presets as P
from .report import Progress, have_matplotlib, plot, table, write_csv, write_json

CPU_BANNER = ("NOTE: these are CPU timings (time.perf_counter medians). They say nothing about "
              "GPU kernel speed;\n      the CPU path only checks the ops and the bench end to end.")


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _name_list(text: str) -> List[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from .suites import BASELINES, OUR_BACKENDS, SUITES

    p = argparse.ArgumentParser(
        prog="python -m microbench",
        description="DFlash kernel microbenchmarks: our backends side by side with the PyTorch "
                    "compositions (and FlashInfer / FlashAttention when importable), against the "
                    "device's measured copy bandwidth. `python -m microbench overhead --help`: "
                    "host time per call of each op with the device work removed.")
    p.add_argument("suite", nargs="?", default="all", choices=SUITES + ("all",),
                   help="which suite (one per op) to run (default: all)")
    p.add_argument("--preset", type=_name_list,
                   help=f"comma-separated shape presets ({', '.join(P.PRESETS)}); default: the four "
                        f"model presets on a GPU, cpu-small on the CPU")
    p.add_argument("--shape", help="custom shape: key=value,... over --preset (keys: hq, hkv, d, h, v, "
                                   "layers, k, s, page, window, rope_theta, cache, logits)")
    p.add_argument("--batch", type=_int_list, help="batch sizes, comma-separated")
    p.add_argument("--ctx", type=_int_list, help="context lengths, comma-separated")
    p.add_argument("--backends", type=_name_list,
                   help=f"implementations to run, of {', '.join(OUR_BACKENDS + BASELINES)} (default: all "
                        f"available; the oracle always runs for the check)")
    p.add_argument("--ops", type=_name_list, help="ops within the suites (default: all)")
    p.add_argument("--modes", type=_name_list, help="modes of the ops that have them (verify_chain: "
                                                    "greedy, sampled, top_k, top_p, top_k+top_p, top_k+top_p_joint, "
                                                    "draft_probs; tree_mask, copy_kv, build_tree: n16, n32, "
                                                    "n64, n128; verify_tree: greedy-n16 .. "
                                                    "sampled-n128; default: all)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), help="activation dtype (default: bf16 on a GPU, "
                                                             "fp16 on the CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton backend on CPU tensors under the Triton interpreter "
                        "(sets TRITON_INTERPRET=1; slow: use tiny shapes)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per implementation "
                                                          "(default 50 on a GPU, 10 on the CPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on the timed runs of one implementation (default 1 s on a GPU, "
                        "0.25 s on the CPU; at least 3 runs are timed)")
    p.add_argument("--no-graph", action="store_true", help="never time with CUDA-graph replay")
    p.add_argument("--rotate-mb", type=float, default=None,
                   help="cycle input copies totalling at least this many MB (default: 2x L2 on a GPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="stop starting new cases after this many seconds (the rest are listed as skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every row and the run's metadata as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and fraction of copy bandwidth")
    p.add_argument("--show-commands", action="store_true", help="print a command that reproduces each row")
    p.add_argument("--tp", type=int, metavar="N", help="verify: vocab-parallel verify_chain on N local "
                                                      "ranks vs the logits all-gather (microbench/tp.py)")
    p.add_argument("--tree", action="store_true", default=None,
                   help="with --tp: verify_tree over a binary tree instead of verify_chain")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing implementations")
    return p


def _command(args, suite, preset, overrides_text, op, mode, batch, ctx, impl, device,
             dtype) -> str:
    parts = ["python", "-m", "microbench", suite, "--preset", preset]
    if overrides_text:
        parts += ["--shape", overrides_text]
    parts += ["--ops", op] + (["--modes", mode] if mode else [])
    parts += ["--batch", str(batch), "--ctx", str(ctx), "--backends", impl, "--dtype", dtype]
    if device.type == "cpu":
        parts += ["--device", "cpu"]
    if args.interpret:
        parts.append("--interpret")
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; returns 0, 1 (a FAIL row, or one of ours raised) or 2 (bad usage)."""
    rest = sys.argv[1:] if argv is None else list(argv)
    if rest[:1] == ["overhead"]:
        from .overhead import main as overhead_main

        return overhead_main(rest[1:])
    if rest[:1] == ["sass"]:
        from .sass import main as sass_main   # the compile report: no GPU, no timings

        return sass_main(rest[1:])
    if rest[:1] == ["verify"]:
        rest[0] = "verify_chain"        # `verify --tp N`: the name docs/tensor_parallel.md uses
    parser = build_parser()
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:       # argparse printed the usage error (or --help)
        return int(exc.code or 0)

    def usage_error(msg: str) -> int:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return 2

    if args.tree and args.tp is None:
        return usage_error("--tree: only with --tp (the vocab-parallel mode)")
    if args.tp is not None:
        if args.suite != "verify_chain":
            return usage_error("--tp: only with the verify (verify_chain) suite")
        from .tp import main as tp_main
        return tp_main(args)

    if args.interpret:
        # Before any kernel module is imported: the interpreter is chosen at import time.
        os.environ["TRITON_INTERPRET"] = "1"
        if "dflash_kernels.triton_backend" in sys.modules and args.device != "cuda":
            print("warning: the Triton backend was imported before --interpret took effect",
                  file=sys.stderr)

    import torch

    from . import suites as S
    from . import timing
    from .runner import run_case

    if args.device == "cuda" and not torch.cuda.is_available():
        return usage_error("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.interpret
                                          else "cpu"))
    gpu = device.type == "cuda"
    default_presets, default_batches, default_ctx = P.GPU_DEFAULT if gpu else P.CPU_DEFAULT
    preset_names = args.preset or ([default_presets[0]] if args.shape else list(default_presets))
    try:
        overrides = P.parse_shape_overrides(args.shape) if args.shape else None
        shapes = [(name, P.resolve(name, overrides)) for name in preset_names]
    except P.ShapeError as exc:
        return usage_error(str(exc))
    known = S.OUR_BACKENDS + S.BASELINES
    if args.backends and any(b not in known for b in args.backends):
        bad = [b for b in args.backends if b not in known]
        return usage_error(f"--backends: unknown {', '.join(bad)}; expected some of {', '.join(known)}")
    suite_names = list(S.SUITES) if args.suite == "all" else [args.suite]
    all_ops = {op for s in suite_names for op in S.module(s).OPS}
    if args.ops and any(o not in all_ops for o in args.ops):
        bad = [o for o in args.ops if o not in all_ops]
        return usage_error(f"--ops: unknown for {args.suite}: {', '.join(bad)}; expected some of "
                           f"{', '.join(sorted(all_ops))}")
    all_modes = {m for s in suite_names for m in getattr(S.module(s), "MODES", ())}
    if args.modes and any(m not in all_modes for m in args.modes):
        return usage_error(f"--modes: expected some of {', '.join(sorted(all_modes)) or 'none'} "
                           f"for {args.suite}, got {', '.join(args.modes)}")
    if args.plot:
        msg = have_matplotlib()
        if msg:
            return usage_error(msg)
    dtype = args.dtype or ("bf16" if gpu else "fp16")
    batches = args.batch or default_batches
    ctxs = args.ctx or default_ctx
    reps = args.reps or (50 if gpu else 10)
    max_seconds = args.max_seconds if args.max_seconds is not None else (1.0 if gpu else 0.25)
    rotate = None if args.rotate_mb is None else int(args.rotate_mb * 2**20)
    if not gpu:
        rotate = rotate or 0

    # Preset outermost, so that a run cut short by --budget has every suite of the first presets.
    plan = []
    for name, shape in shapes:
        for suite in suite_names:
            mod = S.module(suite)
            ops = [o for o in mod.OPS if not args.ops or o in args.ops]
            modes = getattr(mod, "MODES", ("",))       # --modes filters only the ops with modes
            modes = [m for m in modes if not (m and args.modes) or m in args.modes]
            for op, mode in ((op, mode) for op in ops for mode in modes):
                for batch in batches:
                    for ctx in (ctxs if mod.SWEEPS_CTX else ctxs[:1]):
                        plan.append((suite, mod, name, shape, op, mode, batch, ctx))

    if not gpu:
        print(CPU_BANNER)
    bw = timing.measure_copy_bandwidth(device)
    dev_name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or "cpu")
    print(f"device: {dev_name} ({device.type}); copy bandwidth {bw['gbps']:.1f} GB/s "
          f"(read + write of a {bw['nbytes'] / 2**20:.0f} MiB copy); dtype {dtype}; {len(plan)} cases")

    rows, skipped = [], []
    progress = Progress(len(plan), enabled=not args.quiet)
    started = time.perf_counter()
    for suite, mod, name, shape, op, mode, batch, ctx in plan:
        if args.budget is not None and time.perf_counter() - started > args.budget:
            skipped.append(f"{suite}/{op}{mode and f'[{mode}]'} {shape.name} B={batch} ctx={ctx}")
            progress.step("skipped (budget)")
            continue
        progress.step(f"{suite}/{op}{mode and f'[{mode}]'} {shape.name} B={batch} ctx={ctx}")
        case = mod.build_case(op, shape, batch, ctx, dtype, device, interpret=args.interpret,
                              seed=args.seed, **({"mode": mode} if mode else {}))
        rows += run_case(
            case, device, copy_gbps=bw["gbps"], select=args.backends, rotate_bytes=rotate, reps=reps,
            max_seconds=max_seconds, graph=not args.no_graph, verbose=args.verbose,
            command_for=lambda impl, s=suite, n=name, o=op, m=mode, b=batch, c=ctx: _command(
                args, s, n, args.shape, o, m, b, c, impl.name, device, dtype))
    progress.close()

    print(table(rows))
    if skipped:
        print(f"{len(skipped)} cases skipped by --budget {args.budget:g}s: {'; '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""))
    if not gpu:
        print(CPU_BANNER)
    if args.show_commands:
        for r in rows:
            print(r["command"])
    meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "device": {"type": device.type, "name": dev_name, "copy_gbps": bw["gbps"],
                   "copy_nbytes": bw["nbytes"], "l2_bytes": timing.l2_bytes(device),
                   "cpu_timings": not gpu},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton")},
        "dtype": dtype, "skipped_cases": skipped,
    }
    try:
        if args.json:
            write_json(args.json, meta, rows)
        if args.csv:
            write_csv(args.csv, rows)
        if args.plot:
            plot(args.plot, rows, title=f"{dev_name} ({dtype})")
    except OSError as exc:
        print(f"error: could not write output: {exc}", file=sys.stderr)
        return 2
    bad = [r for r in rows if r["status"] == "FAIL" or (r["status"] == "ERROR" and r["kind"] == "ours")]
    if bad:
        print(f"{len(bad)} rows FAILED or raised in our backends", file=sys.stderr)
    return 1 if bad else 0


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None
