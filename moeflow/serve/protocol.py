"""OpenAI request bodies -> engine work, and OpenAI-style error bodies."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.sampling import SamplingParams
from ..errors import ConfigError, MoeflowError


class RequestError(MoeflowError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, kind="invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Job:
    """What one HTTP request asks for: n sequences of one prompt."""

    params: list[SamplingParams]
    experts_top_k: int | None
    stream: bool
    include_usage: bool


def _get(body: dict, key: str, kinds: tuple, default=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{key}' has the wrong type ({type(value).__name__})", param=key)
    return value


def parse_job(body: dict, default_max_tokens: int) -> Job:
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= 16:
        raise RequestError("'n' must be between 1 and 16", param="n")
    stop = _get(body, "stop", (str, list), None) or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    seed = _get(body, "seed", (int,), None)
    moe = _get(body, "moe", (dict,), None) or {}
    top_k = moe.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise RequestError("'moe.top_k' must be an integer", param="moe.top_k")
    max_tokens = _get(body, "max_tokens", (int,), default_max_tokens)
    if max_tokens <= 0:
        raise RequestError(f"'max_tokens' must be positive, got {max_tokens}", param="max_tokens")
    try:
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=float(_get(body, "temperature", (int, float), 1.0)),
                top_p=float(_get(body, "top_p", (int, float), 1.0)),
                seed=None if seed is None else seed + i,
                stop=list(stop),
                ignore_eos=bool(body.get("ignore_eos", False)),
            )
            for i in range(n)
        ]
    except ConfigError as e:
        raise RequestError(str(e)) from None
    options = _get(body, "stream_options", (dict,), None) or {}
    return Job(params, top_k, bool(body.get("stream", False)), bool(options.get("include_usage", False)))
