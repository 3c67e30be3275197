"""Serving benchmark: total generated tokens/s, TTFT and inter-token latency at 1, 4 and 16
concurrent streaming clients, moeflow serve vs llama-cpp-python's server on the same weights.

    python bench/bench_serve.py --model DIR [--gguf FILE] [--clients 1,4,16] [--requests 2]
                                [--max-tokens 64] [--dtype float32] [--json out.json]

Each client sends --requests streaming completions one after another (greedy, EOS ignored,
distinct prompts); servers run one at a time on 127.0.0.1 with 2 threads."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}")
    proc.kill()
    raise SystemExit("server did not start")


def moeflow_cmd(a, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moeflow.cli",
        "serve",
        "--model",
        a.model,
        "--port",
        str(port),
        "--threads",
        "2",
        "--dtype",
        a.dtype,
        "--max-batch",
        "16",
        "--served-model-name",
        "bench",
    ]


def llama_cmd(a, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        a.gguf,
        "--port",
        str(port),
        "--n_threads",
        "2",
        "--n_threads_batch",
        "2",
        "--n_ctx",
        "4096",
        "--model_alias",
        "bench",
        "--use_mmap",
        "false",
    ]


def llama_server_cmd(a, port: int) -> list[str]:
    """llama.cpp's own server: continuous batching over 16 parallel slots of 512 tokens."""
    return [
        a.llama_server,
        "--model",
        a.gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        "2",
        "--threads-batch",
        "2",
        "--ctx-size",
        str(16 * 512),
        "--parallel",
        "16",
        "--load-mode",
        "none",  # resident weights, not mapped (this build's spelling of --no-mmap)
        "--alias",
        "bench",
    ]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "min_tokens": max_tokens,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps)}


async def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(c: int) -> list[dict]:
            out = []
            for i in range(requests):
                try:
                    out.append(
                        await one_request(
                            client, url, f"Client {c} request {i}: once upon a time", max_tokens
                        )
                    )
                except httpx.HTTPError as e:  # a server that drops streams under load: count, do not crash
                    out.append({"error": f"{type(e).__name__}: {e}"})
            return out

        t0 = time.perf_counter()
        everything = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    results = [r for r in everything if "error" not in r]
    failed = len(everything) - len(results)
    if not results:
        return {
            "clients": clients,
            "failed": failed,
            "tokens": 0,
            "wall_s": wall,
            "tok_s": 0.0,
            "ttft_p50": float("nan"),
            "ttft_p99": float("nan"),
            "itl_p50": float("nan"),
            "itl_p99": float("nan"),
        }
    tokens = sum(r["chunks"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    pct = lambda v, q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {
        "clients": clients,
        "failed": failed,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": pct(ttft, 0.99),
        "itl_p50": statistics.median(itl) if itl else None,
        "itl_p99": pct(itl, 0.99) if itl else None,
    }


def run_server(name: str, cmd, a) -> list[dict]:
    port = free_port()
    proc = launch(cmd(a, port), port)
    try:
        asyncio.run(load(port, 1, 1, 4))  # warm-up
        rows = []
        for n in a.clients:
            row = {"server": name, **asyncio.run(load(port, n, a.requests, a.max_tokens))}
            print(
                f"{name:10s} clients={n:2d}  {row['tok_s']:7.1f} tok/s  "
                f"TTFT p50 {row['ttft_p50'] * 1e3:7.0f} ms "
                f"p99 {row['ttft_p99'] * 1e3:7.0f} ms  ITL p50 {row['itl_p50'] * 1e3:6.1f} ms "
                f"p99 {row['itl_p99'] * 1e3:6.1f} ms",
                flush=True,
            )
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def markdown(rows: list[dict]) -> str:
    single = {r["server"]: r["tok_s"] for r in rows if r["clients"] == 1}
    out = [
        "| server | clients | tok/s | × 1 client | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['tok_s'] / single[r['server']]:.2f} | "
            f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | "
            f"{r['itl_p99'] * 1e3:.1f} | {r['failed']} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", default=None, help="the same weights as GGUF, for llama-cpp-python's server")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--servers", default="moeflow,llama.cpp", help="moeflow, llama.cpp, llama-server")
    ap.add_argument(
        "--llama-server",
        default=None,
        help="llama-server binary (built from the llama.cpp sources vendored in llama-cpp-python)",
    )
    a = ap.parse_args()
    a.clients = [int(c) for c in a.clients.split(",")]
    rows = run_server("moeflow", moeflow_cmd, a) if "moeflow" in a.servers else []
    if a.gguf and "llama.cpp" in a.servers:
        rows += run_server("llama.cpp", llama_cmd, a)
    if a.gguf and a.llama_server and "llama-server" in a.servers:
        rows += run_server("llama-server", llama_server_cmd, a)
    print("\n" + markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
