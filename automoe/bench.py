"""Benchmark support shared by `scripts/bench_*.py`: what machine ran, how loaded it was, and the JSON report.

Numbers from a shared CPU machine mean little without the load beside them, so every benchmark records the CPU
model, the busy share of all cores while it ran and the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from automoe.config.moe import MoEConfig
from automoe.host_memory import HOST_ALLOCATORS
from automoe.moe.layer import MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_LAYOUTS = ("1x1", "1x2", "2x1")  # processes x threads


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # everything but idle and iowait


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    """CPU model and core count, torch version and threads, and the 1-minute load average."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],
    }


class LoadMeter:
    """Fraction of the machine's CPU time used by other processes (or stolen) while the benchmark ran."""

    def __enter__(self) -> LoadMeter:
        self.t0, self.busy0 = time.perf_counter(), _busy_ticks()
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        r = resource.getrusage(resource.RUSAGE_SELF)
        own = (r.ru_utime + r.ru_stime) - (self.self0.ru_utime + self.self0.ru_stime)
        busy = (_busy_ticks() - self.busy0) / os.sysconf("SC_CLK_TCK")
        self.other_load = max(0.0, (busy - own) / (wall * os.cpu_count()))
        self.total_load = busy / (wall * os.cpu_count())


class MachineLoadMeter:
    """Fraction of all CPU time that was busy (every process, ours included) while the block ran, and loadavg."""

    def __enter__(self) -> MachineLoadMeter:
        self.t0, self.busy0, self.loadavg_before = time.perf_counter(), _busy_ticks(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        busy = (_busy_ticks() - self.busy0) / os.sysconf("SC_CLK_TCK")
        self.busy = busy / (wall * os.cpu_count())
        self.loadavg_after = os.getloadavg()[0]


# The MoE layer benchmarks' shapes (T=4096 tokens, d=512; `default` and `fine` have the same active FLOPs)
MOE_LAYER_SHAPES = {"default": (8, 2, 1024), "fine": (64, 8, 256), "e128": (128, 8, 128)}  # name -> (E, k, F)


def fake_gate_moe(
    experts: int, topk: int, inter_dim: int, *, dim: int, dtype: torch.dtype, noise: float, backend: str
) -> MoE:
    """The MoE layer every layer benchmark times: SwiGLU experts routed by the `fake_balanced` gate (`noise` =
    `fake_gate_noise`: 0 round-robin, 1 skewed), weights drawn from seed 0 with std dim^-1/2."""
    cfg = MoEConfig(
        dim=dim,
        moe_inter_dim=inter_dim,
        num_experts=experts,
        num_activated_experts=topk,
        gate="fake_balanced",
        fake_gate_noise=noise,
        expert_activation="swiglu",
        experts_backend=backend,
        dtype="float32" if dtype == torch.float32 else "bfloat16",
    )
    layer = MoE(cfg)
    torch.manual_seed(0)
    layer.init_weights(std=dim**-0.5)
    return layer


def add_host_allocator_flag(p: argparse.ArgumentParser) -> None:
    """`--host-allocator`: CPU memory reuse for the whole benchmark, as `train.host_allocator` (apply it first thing
    with `automoe.host_memory.apply_host_allocator`)."""
    p.add_argument(
        "--host-allocator",
        default="cached",
        choices=HOST_ALLOCATORS,
        help="CPU memory reuse, as train.host_allocator (system: the C library's defaults, as before it existed)",
    )


def new_report(args: argparse.Namespace, **extra) -> dict:
    """The JSON report's header (UTC date, `machine_info()`, the command's arguments) with empty `rows`."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "rows": [],
        **extra,
    }


def median_ms_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each callable over `rounds` timed rounds after one untimed warm-up round; every round runs each
    callable once, rotating which goes first, so a burst of load hits all of them."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def report_and_save(report: dict, machine: MachineLoadMeter, json_path: str | Path | None) -> None:
    """Print the CPU the numbers were measured on, record and print the machine load seen during the run, then write
    `report` as JSON when a path is given."""
    report["machine_busy"] = round(machine.busy, 3)
    report["loadavg_before_after"] = [machine.loadavg_before, machine.loadavg_after]
    info = report["machine"]
    print(f"cpu: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, {info['threads']} threads")
    print(
        f"machine busy {machine.busy:.0%} of {os.cpu_count()} cores x wall (all processes); "
        f"loadavg {machine.loadavg_before:.2f} -> {machine.loadavg_after:.2f}"
    )
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")


def _matmul_rates(
    dtype_name: str, shape: tuple[int, int, int], *, threads: int, repeats: int, iters: int
) -> list[float]:
    """GFLOP/s of `repeats` bursts of `iters` products `a @ b` (into a preallocated output)."""
    torch.set_num_threads(threads)
    M, K, N = shape
    dtype = DTYPES[dtype_name]
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    out = torch.empty(M, N, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        rates.append(2 * M * K * N * iters / (time.perf_counter() - t0) / 1e9)
    return rates


def _matmul_child(barrier, queue, dtype_name, shape, repeats, iters) -> None:
    barrier.wait()
    queue.put(_matmul_rates(dtype_name, shape, threads=1, repeats=repeats, iters=iters))


def matmul_gflops(
    dtype_name: str, shape: tuple[int, int, int], layout: str, *, repeats: int, iters: int
) -> list[float]:
    """Aggregate GFLOP/s per burst of (M x K) @ (K x N) products for one processes x threads `layout` of
    MATMUL_LAYOUTS (bursts of the 2 processes of `2x1` are paired by index): the MFU denominator."""
    if layout == "1x1":
        return _matmul_rates(dtype_name, shape, threads=1, repeats=repeats, iters=iters)
    if layout == "1x2":
        return _matmul_rates(dtype_name, shape, threads=2, repeats=repeats, iters=iters)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_matmul_child, args=(barrier, queue, dtype_name, shape, repeats, iters))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    per_proc = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return [a + b for a, b in zip(*per_proc)]
