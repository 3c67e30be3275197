"""`moeflow serve`: an OpenAI-compatible HTTP server over one model."""

from __future__ import annotations

import sys
from pathlib import Path

from ..llm import LLM


def run(a) -> int:
    import uvicorn

    from ..serve.app import Server, create_app

    llm = LLM(
        a.model,
        dtype=a.dtype,
        device=a.device,
        threads=a.threads,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_batch,
        progress=sys.stderr.isatty(),
    )
    name = a.served_model_name or Path(llm.loaded.path).name
    server = Server(llm, name, max_waiting=a.max_waiting)
    print(f"moeflow: serving '{name}' on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level)
    finally:
        server.engine.close()
    return 0
