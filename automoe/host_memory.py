"""Host (CPU) memory reuse: keep freed large blocks in the process instead of returning them to the OS.

PyTorch's CPU tensors come straight from the C library's `malloc`. glibc serves every block of 32 MiB or more
(and, until its adaptive threshold has grown, every block over 128 KiB) with a fresh `mmap` and gives it back with
`munmap` on free. A training step that allocates the same large activations and gradients every step then
page-faults on every one of their pages, every step: the kernel maps and zeroes 4 KiB at a time. On the 2-core
AMD EPYC of docs/benchmarks.md#host-memory-reuse that cost the MoE layer's default fp32 step 9-15% and a skewed
fine-grained step 37%, mostly in elementwise ops writing new outputs.

`cached` (the default of `train.host_allocator`) sets glibc's mmap threshold and trim threshold to their largest
values with `mallopt`, so freed blocks stay in the heap and the next step's tensors reuse pages that are already
mapped: what the CUDA caching allocator does for GPU memory. The cost is resident memory: the process keeps its
heap, and glibc does not always fit a request into a freed block of nearly the same size, so the heap settled
12-63% above the system allocator's peak in scripts/bench_host_memory.py, and 9% above it when glibc's per-thread
cache is off (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0` in the environment of the launch; glibc reads it only
at process start, so this module can only suggest it). `system` leaves the C library's
defaults. On a C library other than glibc (macOS, musl) `cached` does nothing and says so; GPU memory is
unaffected either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

HOST_ALLOCATORS = ("cached", "system")
# glibc's per-thread cache keeps the small pieces that aligned allocations split off, and they keep freed large
# blocks from merging; with it off (read only at process start) the heap settles near the system allocator's peak
TCACHE_OFF = "glibc.malloc.tcache_count=0"
# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt takes an int: blocks up to 2 GiB come from the heap, larger ones still from mmap
_INT_MAX = 2**31 - 1


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def apply_host_allocator(mode: str) -> str:
    """Apply `train.host_allocator` (`cached` | `system`) to this process; returns what was done, for the log.
    Idempotent; `system` after `cached` does not restore glibc's adaptive defaults (start a new process)."""
    if mode not in HOST_ALLOCATORS:
        raise ValueError(f"train.host_allocator={mode!r} is not one of {list(HOST_ALLOCATORS)}")
    if mode == "system":
        return "host allocator: the C library's defaults"
    libc = _libc()
    if libc is None:
        return f"host allocator: 'cached' needs glibc; {platform.system()} {platform.libc_ver()[0] or ''} keeps its own"
    ok = all(
        libc.mallopt(ctypes.c_int(param), ctypes.c_int(_INT_MAX)) == 1
        for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)
    )
    if not ok:
        return "host allocator: glibc refused the mallopt thresholds; the C library's defaults stay"
    return "host allocator: cached (glibc keeps freed blocks up to 2 GiB for reuse)" + tcache_hint()


def tcache_hint() -> str:
    """What the `cached` log line adds while glibc's per-thread cache is on (see TCACHE_OFF); "" once it is off."""
    if TCACHE_OFF in os.environ.get("GLIBC_TUNABLES", ""):
        return ""
    return f"; export GLIBC_TUNABLES={TCACHE_OFF} before launching to keep resident memory lower"
