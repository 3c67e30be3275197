"""Cold expert reads the way the store's demand path issues them: 8 random experts at a time on a
thread pool, every byte from the disk (the checkpoint is dropped from the page cache first, and
buffered reads drop each range after reading it). Three read paths:

- per tensor: one buffered `preadv` per tensor (gate, up, down), the store's path before;
- per expert, buffered: one scatter `preadv` per expert, then posix_fadvise(DONTNEED);
- per expert, O_DIRECT: the store's path now (the aligned span through a bounce buffer).

Reports read rate, time per 8 experts, and the CPU time (user + system, all threads) spent per
expert: on a 2-core machine, reader CPU is taken from the compute.

    python bench/bench_reads.py bench/.cache/smollm2-moe-e32k8 [--experts 1200] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from moeflow.loader.checkpoint import Checkpoint
from moeflow.store.extents import expert_map
from moeflow.store.reader import FileReader


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--experts", type=int, default=1200, help="experts read per configuration")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    ck = Checkpoint(a.model)
    c = ck.config
    E = c.get("num_experts") or c["num_local_experts"]
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    layers = sorted({int(k.split(".")[2]) for k in ck.header if ".experts." in k})
    em = expert_map(ck, {k: k for k in ck.header}, layers, E, inter, c["hidden_size"])
    direct, buffered = FileReader(ck.files), FileReader(ck.files)
    buffered._direct.clear()
    fds = buffered._fds
    print(f"{len(em.extents)} experts of {em.nbytes / 1e3:.0f} KB, {a.threads} threads, cold reads")
    print(f"O_DIRECT available: {direct.mode}")

    def per_tensor(runs, buf):
        raw, s = memoryview(buf.view(torch.uint8).numpy()), buf.element_size()
        for r in runs:
            off = r.offset
            for dst, n in r.pieces:
                os.preadv(fds[r.file], [raw[dst * s : dst * s + n]], off)
                os.posix_fadvise(fds[r.file], off, n, os.POSIX_FADV_DONTNEED)
                off += n

    paths = (
        ("per tensor, buffered", per_tensor),
        ("per expert, buffered", buffered.read_into),
        ("per expert, O_DIRECT", direct.read_into),
    )
    keys, rng = list(em.extents), random.Random(0)
    bufs = [torch.empty(em.numel, dtype=em.dtype) for _ in range(8)]
    pool = ThreadPoolExecutor(a.threads)
    for _ in range(a.rounds):
        for name, fn in paths:
            for fd in fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            batches = [rng.sample(keys, 8) for _ in range(a.experts // 8)]
            c0, t0 = cpu_s(), time.perf_counter()
            for batch in batches:
                for f in wait([pool.submit(fn, em.extents[k], b) for k, b in zip(batch, bufs)]).done:
                    f.result()
            dt, cpu = time.perf_counter() - t0, cpu_s() - c0
            n = len(batches) * 8
            print(
                f"{name:22s} {n * em.nbytes / dt / 1e9:5.2f} GB/s  {dt / len(batches) * 1e3:5.2f} ms per 8"
                f"  CPU {cpu / n * 1e6:4.0f} us per expert"
            )


if __name__ == "__main__":
    main()
