"""What background expert reads cost the compute on this machine, with no cache logic involved.

The model decodes with all experts in RAM while a hook before every decoder layer issues N cold
O_DIRECT reads of 336 KB (an expert of the converted SmolLM2-MoE) at random places in its
checkpoint, the way a prefetcher would, and never waits for them. Two ways of issuing them:

- threads: a 4-thread pool doing pread, as the store's prefetch pool does;
- aio: Linux native AIO (io_submit/io_getevents through raw syscalls), no threads at all: the
  main thread submits and reaps, the kernel does the rest.

If decode slows as much with aio as with threads, the cost is not Python or the reader threads'
CPU but the I/O itself (on this VM: completions and the virtual disk's work land on the same two
vCPUs the matmuls run on).

    python bench/bench_io_contention.py bench/.cache/smollm2-moe-e32k8 --reads 0 2 5
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from moeflow.corpus import read_text
from moeflow.engine.sampling import SamplingParams
from moeflow.llm import LLM
from moeflow.loader.checkpoint import Checkpoint
from moeflow.store.aio import AioQueue
from moeflow.tokenizer import encode

NB = 336 * 1024


class Aio:
    """Fire-and-forget reads on moeflow's AIO queue (the store's own path, minus the cache)."""

    def __init__(self, depth: int = 256):
        self.q = AioQueue(depth)

    def submit(self, tag: int, fd: int, addr: int, nbytes: int, offset: int) -> None:
        if not self.q.free:
            self.q.reap(1)
        self.q.submit([(tag, fd, addr, nbytes, offset)])

    def reap(self) -> None:
        self.q.reap(0)


def run(model: str, mode: str, per_layer: int, tokens: int, rounds: int) -> dict:
    llm = LLM(model, progress=False)
    f = Checkpoint(model).files[0]
    size, fd = f.stat().st_size, os.open(f, os.O_RDONLY | os.O_DIRECT)
    bufs = [mmap.mmap(-1, NB) for _ in range(64)]  # page-aligned, as O_DIRECT needs
    addrs = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in bufs]
    rng, pool = random.Random(0), ThreadPoolExecutor(4)
    aio = Aio() if mode == "aio" else None
    issued = [0]

    def hook(mod, inp):
        for _ in range(per_layer):
            i, issued[0] = issued[0] % len(bufs), issued[0] + 1
            off = rng.randrange(0, size - NB) & ~4095
            if aio is not None:
                aio.submit(issued[0], fd, addrs[i], NB, off)
            else:
                pool.submit(os.preadv, fd, [memoryview(bufs[i])], off)
        if aio is not None:
            aio.reap()

    if per_layer:
        for layer in llm.loaded.model.model.layers:
            layer.register_forward_pre_hook(hook)
    ids = encode(llm.tokenizer, read_text("builtin:evaluation"))[5000:5032]
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[ids], sampling_params=sp)  # warm-up
    tps, t0, n0 = [], time.perf_counter(), issued[0]
    for _ in range(rounds):
        tps.append(llm.generate(prompt_token_ids=[ids], sampling_params=sp)[0].stats.decode_tps)
    gbs = (issued[0] - n0) * NB / (time.perf_counter() - t0) / 1e9
    pool.shutdown(wait=True)
    return {
        "mode": mode,
        "reads_per_layer": per_layer,
        "decode_tps": sorted(tps)[len(tps) // 2],
        "read_gbs": gbs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--reads", type=int, nargs="+", default=[0, 2, 5], help="reads issued per layer")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    base = None
    for n in a.reads:
        for mode in ("threads", "aio") if n else ("none",):
            r = run(a.model, mode, n, a.tokens, a.rounds)
            base = base or r["decode_tps"]
            tps = r["decode_tps"]
            print(
                f"{mode:8s} {n} reads/layer  decode {tps:6.2f} tok/s ({tps / base:.2f}x)"
                f"  background reads {r['read_gbs']:.2f} GB/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
