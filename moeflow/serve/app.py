"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, on FastAPI + uvicorn."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import MoeflowError
from ..llm import LLM
from ..tokenizer import apply_chat, encode
from .bridge import EngineThread, Event, Handle, Overloaded
from .metrics import Metrics
from .protocol import Job, RequestError, error_body, parse_job


class Server:
    def __init__(self, llm: LLM, model_name: str, max_waiting: int = 64, default_max_tokens: int = 256):
        self.llm, self.model_name, self.default_max_tokens = llm, model_name, default_max_tokens
        a = llm.args
        self.metrics = Metrics(a.n_layers, a.moe_layers, a.moe.n_experts)
        llm.engine.reserve(llm.engine.max_num_seqs, llm.max_model_len)
        self.engine = EngineThread(llm.engine, max_waiting, self.metrics)

    async def read(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                f"model '{model}' does not exist; this server serves '{self.model_name}'",
                status=404,
                param="model",
                kind="not_found_error",
            )
        return body

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        tok = self.llm.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list", param="messages")
            return apply_chat(tok, messages)[1]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return encode(tok, prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        raise RequestError(
            "'prompt' must be a string, a list of one string, or a list of token ids", param="prompt"
        )

    def submit(self, ids: list[int], job: Job) -> list[Handle]:
        handles, queue = [], asyncio.Queue()
        try:
            for i, p in enumerate(job.params):
                handles.append(self.engine.submit(ids, p, job.experts_top_k, queue, i))
        except BaseException:
            for h in handles:
                self.engine.abort(h)
            raise
        return handles


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="moeflow")

    @app.exception_handler(MoeflowError)
    async def moeflow_error(request: Request, e: MoeflowError):
        status, kind, param, headers = 400, "invalid_request_error", None, None
        if isinstance(e, RequestError):
            status, kind, param = e.status, e.kind, e.param
        if isinstance(e, Overloaded):
            status, kind, headers = 503, "server_overloaded", {"Retry-After": "1"}
        server.metrics.requests.labels(request.url.path, str(status)).inc()
        return JSONResponse(error_body(str(e), kind, param), status_code=status, headers=headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": server.model_name, "object": "model", "created": 0, "owned_by": "moeflow"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    async def handle(request: Request, chat: bool):
        body = await server.read(request)
        ids = server.prompt_ids(body, chat)
        job = parse_job(body, server.default_max_tokens)
        handles = server.submit(ids, job)
        server.metrics.requests.labels(request.url.path, "200").inc()
        reply = Reply(server.model_name, chat, len(ids))
        if job.stream:
            return StreamingResponse(
                stream(handles, reply, job.include_usage), media_type="text/event-stream"
            )
        try:
            return reply.whole(await collect(handles))
        except asyncio.CancelledError:
            for h in handles:
                server.engine.abort(h)
            raise

    async def collect(handles: list[Handle]) -> list[Event]:
        texts: list[list[str]] = [[] for _ in handles]
        done: dict[int, Event] = {}
        while len(done) < len(handles):
            ev = await handles[0].queue.get()
            if ev.error:
                raise RequestError(ev.error, status=ev.status, kind=ev.kind)
            texts[ev.index].append(ev.delta)
            if ev.output is not None:
                ev.delta = "".join(texts[ev.index])
                done[ev.index] = ev
        return [done[i] for i in range(len(handles))]

    async def stream(handles: list[Handle], reply, include_usage: bool) -> AsyncIterator[str]:
        pending = {h.index: h for h in handles}
        completion_tokens = 0
        try:
            for chunk in reply.first_chunks(len(handles)):
                yield sse(chunk)
            while pending:
                ev = await handles[0].queue.get()
                if ev.error:
                    yield sse(error_body(ev.error, ev.kind))
                    pending.pop(ev.index)
                    continue
                finish = ev.output.finish_reason if ev.output else None
                if ev.delta or finish:
                    yield sse(reply.chunk(ev.index, ev.delta, finish))
                if ev.output is not None:
                    completion_tokens += len(ev.output.token_ids)
                    pending.pop(ev.index)
            if include_usage:
                yield sse(reply.usage_chunk(completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            for h in pending.values():  # client went away mid-stream: free its KV slots now
                server.engine.abort(h)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Reply:
    """Builds OpenAI response objects for one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, completion: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def whole(self, events: list[Event]) -> dict:
        choices = []
        for i, ev in enumerate(events):
            c = {"index": i, "finish_reason": ev.output.finish_reason, "logprobs": None}
            if self.chat:
                c["message"] = {"role": "assistant", "content": ev.delta}
            else:
                c["text"] = ev.delta
            choices.append(c)
        completion = sum(len(ev.output.token_ids) for ev in events)
        return {**self._head(self.object), "choices": choices, "usage": self.usage(completion)}

    def first_chunks(self, n: int) -> list[dict]:
        if not self.chat:
            return []
        return [self._chunk_obj(i, {"role": "assistant", "content": ""}, None) for i in range(n)]

    def _chunk_obj(self, i: int, delta, finish) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        choice = {"index": i, "finish_reason": finish, "logprobs": None}
        choice.update({"delta": delta} if self.chat else {"text": delta})
        return {**self._head(obj), "choices": [choice]}

    def chunk(self, i: int, text: str, finish: str | None) -> dict:
        return self._chunk_obj(i, {"content": text} if self.chat else text, finish)

    def usage_chunk(self, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(completion)}
