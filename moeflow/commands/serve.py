"""`moeflow serve`: an OpenAI-compatible HTTP server over one model."""

from __future__ import annotations

import sys
from pathlib import Path

from .format import llm_from_args


def run(a) -> int:
    import uvicorn

    from ..serve.app import Server, create_app

    llm = llm_from_args(a, max_num_seqs=a.max_batch)
    name = a.served_model_name or Path(llm.loaded.path).name
    server = Server(llm, name, max_waiting=a.max_waiting)
    print(f"moeflow: serving '{name}' on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level)
    finally:
        server.engine.close()
    return 0
