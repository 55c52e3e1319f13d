"""Output: terminal table, progress bar, JSON, CSV and PNG plot."""

from __future__ import annotations

import csv
import json
import sys
import time
from typing import Dict, List, Optional

SCHEMA = "dflash-microbench/1"

CSV_KEYS = ("suite", "op", "mode", "preset", "dtype", "batch", "ctx", "impl", "kind", "status", "time_ms",
            "min_ms", "max_ms", "runs", "timing", "copies", "bytes", "gbps", "frac_copy_bw",
            "speedup_vs_torch", "check", "max_abs_err", "error", "shape", "command")


class Progress:
    """``[#####.....] 12/40 text`` on stderr: redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 24):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        fill = int(self.width * self.done / self.total)
        secs = time.perf_counter() - self.start
        line = f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} {secs:5.0f}s {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def label(r: Dict) -> str:
    """``op`` for a suite's own op (suites are named after ops), else ``suite/op``
    (inject_kv/injection), with ``[mode]`` after it when the op has modes."""
    name = r["op"] if r["op"] == r["suite"] else f"{r['suite']}/{r['op']}"
    return name + (f"[{r['mode']}]" if r.get("mode") else "")


def table(rows: List[Dict]) -> str:
    """Plain-text columns, one line per row."""
    head = ("suite/op", "preset", "B", "ctx", "impl", "status", "time ms", "GB/s", "%copy", "vs torch",
            "check")
    lines = [head]
    for r in rows:
        lines.append((
            label(r), r["preset"], str(r["batch"]), str(r["ctx"]), r["impl"],
            r["status"], _num(r["time_ms"], ".4f"), _num(r["gbps"], ".1f"),
            "-" if r["frac_copy_bw"] is None else f"{100 * r['frac_copy_bw']:.1f}",
            "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x",
            (r["check"] or "") + (f" [{r['error']}]" if r["error"] else ""),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for line in lines:
        cells = [c.rjust(w) if i in (2, 3, 6, 7, 8, 9) else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells + [line[-1]]).rstrip())
    return "\n".join(out)


def write_json(path: str, meta: Dict, rows: List[Dict]) -> None:
    with open(path, "w") as f:
        json.dump({"schema": SCHEMA, **meta, "rows": rows}, f, indent=1, default=str)
        f.write("\n")


def write_csv(path: str, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_KEYS)
        for r in rows:
            vals = []
            for k in CSV_KEYS:
                v = r.get(k)
                if k == "shape" and isinstance(v, dict):
                    v = ";".join(f"{a}={b}" for a, b in v.items())
                vals.append("" if v is None else v)
            w.writerow(vals)


def have_matplotlib() -> Optional[str]:
    """None when matplotlib imports, else the message to show."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:
        return (f"--plot needs matplotlib, which is not importable here ({type(exc).__name__}); "
                "install it (pip install matplotlib, or the 'bench' extra) or drop --plot")
    return None


def plot(path: str, rows: List[Dict], title: str = "") -> None:
    """Time and fraction of the copy bandwidth against context length (or batch), one
    row of panels per (op and mode, preset), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "OK" and r["time_ms"]]
    groups: Dict[tuple, List[Dict]] = {}
    for r in ok:
        groups.setdefault((label(r), r["preset"]), []).append(r)
    n = max(len(groups), 1)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.2 * n), squeeze=False)
    for ax_row, ((name, preset), rs) in zip(axes, sorted(groups.items())):
        x_key = "ctx" if len({r["ctx"] for r in rs}) > 1 else "batch"
        other = "batch" if x_key == "ctx" else "ctx"
        lines: Dict[tuple, List[Dict]] = {}
        for r in rs:
            lines.setdefault((r["impl"], r[other]), []).append(r)
        for (impl, o), pts in sorted(lines.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            pts.sort(key=lambda r: r[x_key])
            xs = [r[x_key] for r in pts]
            label = f"{impl} {other}={o}"
            ax_row[0].plot(xs, [r["time_ms"] for r in pts], marker="o", label=label)
            if all(r["frac_copy_bw"] is not None for r in pts):
                ax_row[1].plot(xs, [r["frac_copy_bw"] for r in pts], marker="o", label=label)
        for ax, ylabel in zip(ax_row, ("median time (ms)", "fraction of copy bandwidth")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} {preset}", fontsize=9)
            ax.grid(True, alpha=0.3)
        ax_row[0].set_yscale("log")
        ax_row[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.2 * n)) if title else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)
