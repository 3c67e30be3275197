"""Memory read-bandwidth probe.

Batch-1 decode of an MoE model is bound by how fast weights stream from DRAM, so engines are
compared by the fraction of *currently available* bandwidth they achieve.  On shared 2-vCPU
machines that bandwidth drifts by tens of percent over minutes, so the benchmark calls
``probe_gbps`` right before every round instead of once.

The probe is an fp32 matrix-vector product over a buffer far larger than the caches: that is
the access pattern of a decode step, and on this class of machine it reads ~15% faster than
``tensor.sum()`` (which would let a good engine score above 100%).

    python bench/membw.py [--seconds 1.0] [--mib 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# 1 GiB is far beyond any last-level cache on this class of machine, so every rep reads DRAM.
DEFAULT_MIB = 1024
COLS = 4096  # row length of the probe matrix; 1k-16k all measure the same
_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _operands(mib: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Allocating and first-touching 1 GiB costs ~0.5 s; reuse it across rounds.
    if mib not in _buffers:
        rows = mib * 1024 * 1024 // 4 // COLS
        _buffers[mib] = (torch.ones(rows, COLS), torch.ones(COLS))
    return _buffers[mib]


def probe_samples(seconds: float = 1.0, mib: int = DEFAULT_MIB, threads: int = 2) -> list[float]:
    """GB/s of each rep of a GEMV over a ``mib`` MiB fp32 matrix, repeated for about ``seconds``."""
    mat, vec = _operands(mib)
    nbytes = mat.numel() * mat.element_size()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mv(mat, vec)  # warm the thread pool and page tables before timing
        samples: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(samples) < 3 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mv(mat, vec)
            samples.append(nbytes / (time.perf_counter() - t0) / 1e9)
    finally:
        torch.set_num_threads(prev_threads)
    return samples


def probe_gbps(seconds: float = 1.0, mib: int = DEFAULT_MIB, threads: int = 2) -> float:
    """Best read bandwidth in GB/s (1e9 B/s) over ~``seconds``.

    The best rep rather than the median: interference from other processes only ever lowers a
    rep, so the maximum is the closest estimate of what the memory system can deliver right now.
    """
    return max(probe_samples(seconds, mib, threads))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--mib", type=int, default=DEFAULT_MIB)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    s = probe_samples(a.seconds, a.mib, a.threads)
    print(f"best {max(s):.1f} GB/s  median {statistics.median(s):.1f} GB/s  over {len(s)} reps")


if __name__ == "__main__":
    main()
