"""Cold expert reads the way the store's demand path issues them: 8 random experts at a time on a
thread pool, every byte from the disk (the checkpoint is dropped from the page cache first and
each range after its read). Compares one read per tensor against the store's coalesced scatter
read (one `preadv` per run of back-to-back tensors), each with the kernel's default readahead and
with POSIX_FADV_RANDOM.

    python bench/bench_reads.py bench/.cache/smollm2-moe-e32k8 [--experts 1200] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from moeflow.loader.checkpoint import Checkpoint
from moeflow.store.extents import expert_map

ADVICE = (("default readahead", os.POSIX_FADV_NORMAL), ("FADV_RANDOM", os.POSIX_FADV_RANDOM))


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
    fds = {f: os.open(f, os.O_RDONLY) for f in ck.files}
    print(f"{len(em.extents)} experts of {em.nbytes / 1e3:.0f} KB, {a.threads} threads, cold reads")

    def per_tensor(runs, buf):
        raw, s = memoryview(buf.view(torch.uint8).numpy()), buf.element_size()
        for r in runs:
            off = r.offset
            for dst, n in r.pieces:
                os.preadv(fds[r.file], [raw[dst * s : dst * s + n]], off)
                os.posix_fadvise(fds[r.file], off, n, os.POSIX_FADV_DONTNEED)
                off += n

    def coalesced(runs, buf):
        raw, s = memoryview(buf.view(torch.uint8).numpy()), buf.element_size()
        for r in runs:
            os.preadv(fds[r.file], [raw[d * s : d * s + n] for d, n in r.pieces], r.offset)
            os.posix_fadvise(fds[r.file], r.offset, r.nbytes, os.POSIX_FADV_DONTNEED)

    keys, rng = list(em.extents), random.Random(0)
    bufs = [torch.empty(em.numel, dtype=em.dtype) for _ in range(8)]
    pool = ThreadPoolExecutor(a.threads)
    for _ in range(a.rounds):
        for name, fn in (("per tensor", per_tensor), ("coalesced", coalesced)):
            for advice, flag in ADVICE:
                for fd in fds.values():
                    os.posix_fadvise(fd, 0, 0, flag)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                batches = [rng.sample(keys, 8) for _ in range(a.experts // 8)]
                t0 = time.perf_counter()
                for batch in batches:
                    wait([pool.submit(fn, em.extents[k], b) for k, b in zip(batch, bufs)])
                dt = time.perf_counter() - t0
                gbs = len(batches) * 8 * em.nbytes / dt / 1e9
                ms = dt / len(batches) * 1e3
                print(f"{name:10s} {advice:17s} {gbs:5.2f} GB/s  {ms:5.2f} ms per 8 experts")


if __name__ == "__main__":
    main()
