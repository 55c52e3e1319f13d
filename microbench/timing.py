"""Timers: CUDA events or CUDA-graph replay on a GPU, perf_counter on the CPU.

Every timer takes ``call(i)``, which runs the op on input set ``i % copies``:
cycling through several copies of the inputs keeps them from being served out
of L2 (the caller sizes ``copies`` so that all of them exceed twice the L2).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import roofline

# Below this many microseconds per call, the CPU-side launch cost of a Python
# op would show in event timings; such cases are replayed from a CUDA graph.
GRAPH_BELOW_US = 200.0
GRAPH_MIN_US = 1000.0          # a captured graph runs for at least this long
DEFAULT_L2_BYTES = 50 * 2**20  # H100 / H200


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int
    method: str               # "graph", "events" or "cpu"
    note: str = ""


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 10) -> dict:
    """Device-to-device copy bandwidth in GB/s, counting read + write bytes.

    On a GPU: a copy of ``nbytes`` (default 1 GiB, less when memory is short)
    timed with CUDA events, median of ``reps``. On the CPU: a 64 MiB memcpy.
    """
    if device.type == "cuda":
        if nbytes is None:
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(2**30, free // 8))
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
    else:
        nbytes = nbytes or 64 * 2**20
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(max(3, reps // 2)):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"gbps": roofline.gbps(roofline.copy_bytes(nbytes), t), "nbytes": nbytes, "seconds": t}


def copies_for(per_copy_bytes: int, device: torch.device, rotate_bytes: Optional[int],
               max_copies: int = 64) -> int:
    """How many input sets to cycle so that together they exceed ``rotate_bytes``
    (default: twice the L2 on a GPU, one set on the CPU), within a quarter of
    the free device memory."""
    if rotate_bytes is None:
        rotate_bytes = 2 * l2_bytes(device)
    if rotate_bytes <= 0 or per_copy_bytes <= 0:
        return 1
    n = math.ceil(rotate_bytes / per_copy_bytes)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(n, max(1, int(free // 4 // per_copy_bytes)))
    return max(1, min(n, max_copies))


def _summary(times, method, note=""):
    return Timing(statistics.median(times), min(times), max(times), len(times), method, note)


def _time_cpu(call, copies, warmup, reps, max_seconds):
    est = 0.0
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        call(i % copies)
        est = max(time.perf_counter() - t0, 1e-7)
    n = int(max(3, min(reps, max_seconds / est)))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i % copies)
        times.append(time.perf_counter() - t0)
    return _summary(times, "cpu")


def _time_events(call, copies, reps):
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        call(i % copies)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def _time_graph(call, copies, est_s, reps):
    per_graph = max(copies, math.ceil(GRAPH_MIN_US * 1e-6 / max(est_s, 1e-7)))
    per_graph = min(copies * math.ceil(per_graph / copies), max(copies, 2000))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(per_graph):
            call(j % copies)
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    del graph
    return [s.elapsed_time(e) / 1e3 / per_graph for s, e in zip(starts, ends)], per_graph


def time_call(call: Callable[[int], object], copies: int, device: torch.device, *, warmup: int = 5,
              reps: int = 50, max_seconds: float = 1.0, graph: bool = True) -> Timing:
    """Median time of ``call(i)`` cycling over ``copies`` input sets.

    GPU: after ``warmup`` calls, one cycle through the copies estimates the
    time per call; calls faster than GRAPH_BELOW_US are captured back to back
    in a CUDA graph (at least GRAPH_MIN_US long) and each replay is timed with
    events, else every call is timed with its own pair of events. The number
    of timed runs is ``reps``, fewer when they would take over ``max_seconds``.
    """
    if device.type != "cuda":
        return _time_cpu(call, copies, warmup, reps, max_seconds)
    for i in range(max(warmup, copies)):
        call(i % copies)
    torch.cuda.synchronize()
    est = statistics.median(_time_events(call, copies, max(3, copies)))
    n = int(max(5, min(reps, max_seconds / max(est, 1e-7))))
    note = ""
    if graph and est * 1e6 < GRAPH_BELOW_US:
        try:
            times, per_graph = _time_graph(call, copies, est, n)
            return _summary(times, "graph", f"{per_graph} calls per replay")
        except Exception as exc:  # not capturable: time it with events instead
            torch.cuda.synchronize()
            note = f"graph capture failed ({type(exc).__name__}); events"
    return _summary(_time_events(call, copies, n), "events", note)
