"""The public entry point: LLM(path).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .engine.engine import Engine
from .engine.sampling import SamplingParams
from .engine.sequence import RequestOutput, Sequence
from .errors import ConfigError
from .kernels import native
from .loader.open import open_model
from .store.config import StoreConfig
from .tokenizer import apply_chat, encode

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but this machine has no usable CUDA GPU")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"device {device!r} is not supported (cpu, cuda, cuda:N)")
    return device


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        threads: int | None = None,
        progress: bool = True,
        expert_memory: str | int | None = None,
        expert_policy: str = "cyclic",
        expert_scope: str = "global",
        prefetch: str = "auto",
        expert_trace: str | Path | None = None,
        host_memory: str | int | None = None,
        on_miss: str = "copy",
        expert_io: str = "auto",
        expert_io_threads: int = 4,
    ):
        """expert_memory: a budget ("2GiB", "25%", bytes) for experts in RAM; the rest are read from
        the checkpoint files on demand (None: every expert resident). expert_policy: cyclic, lru,
        lfu, reuse or pinned; prefetch: lookahead, learned, frequency, cooccurrence, none, or auto
        (learned when expert_trace carries its fitted maps, else none); expert_trace: a routing
        trace of this model (`moeflow trace`) that pinned, learned and cooccurrence learn from.
        With device="cuda", expert_memory is the GPU's budget over a RAM tier (host_memory: its
        budget, None for every expert in pinned RAM) and on_miss="cpu" computes a missed expert on
        the CPU instead of waiting for its copy. expert_io: how expert reads reach the disk, aio
        (Linux native AIO), threads (a reader pool) or auto (aio where it works);
        expert_io_threads: the reader pool's size (1: one read at a time, in order)."""
        store = StoreConfig(
            expert_memory,
            expert_policy,
            expert_scope,
            prefetch,
            trace=None if expert_trace is None else str(expert_trace),
            host_memory=host_memory,
            on_miss=on_miss,
            io=expert_io,
            io_threads=expert_io_threads,
        )
        if threads:
            torch.set_num_threads(threads)
        if model is None:
            from .default_model import default_model_path

            model = default_model_path(progress=progress)
        self.dtype, self.device = resolve_dtype(dtype), resolve_device(device)
        if self.device == "cpu":
            native()  # build or load the kernel now, not inside the first request's timing
        self.loaded, self.tokenizer = open_model(model, self.dtype, self.device, progress, store)
        self.args = self.loaded.args
        limit = self.args.max_position
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise ConfigError(
                f"max_model_len must be in 2..{limit} (the model's context), got {max_model_len}"
            )
        self.max_model_len = max_model_len or min(limit, 4096)
        self.engine = Engine(
            self.loaded, self.tokenizer, self.dtype, self.device, self.max_model_len, max_num_seqs
        )

    def expert_stats(self) -> dict | None:
        """Hit rate, bytes read, I/O stall and prediction precision/recall of a tiered expert
        store since loading; None when every expert is resident."""
        report = getattr(self.loaded.experts, "report", None)
        return report() if report else None

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt is text, a list of chat messages, or a list of token ids."""
        if isinstance(prompt, str):
            return prompt, encode(self.tokenizer, prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return apply_chat(self.tokenizer, prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ConfigError("a prompt must be a string, a list of chat messages, or a list of token ids")

    def _submit(
        self, prompts: list, params: SamplingParams | list[SamplingParams], experts_top_k: int | None = None
    ) -> list[Sequence]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        need = max(len(ids) + sp.max_tokens for (_, ids), sp in zip(encoded, plist))
        self.engine.reserve(len(prompts), need)
        for _, ids in encoded:  # all checked before any is queued, so a bad one queues nothing
            self.engine.validate(ids, experts_top_k)
        return [self.engine.add(ids, sp, text, experts_top_k) for (text, ids), sp in zip(encoded, plist)]

    def generate(
        self,
        prompts=None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
        experts_top_k: int | None = None,
    ) -> list[RequestOutput]:
        """Runs a batch to completion. `prompts`: one or many strings or chat conversations."""
        batch = _as_batch(prompts) if prompts is not None else list(prompt_token_ids or [])
        if not batch:
            raise ConfigError("no prompts given")
        seqs = self._submit(batch, sampling_params or SamplingParams(), experts_top_k)
        try:
            while any(s.finish_reason is None for s in seqs):
                self.engine.step()
        except BaseException:  # a failed step (e.g. a file truncated under the expert store)
            for s in seqs:  # leaves nothing of this batch in the engine
                if s.finish_reason is None:
                    self.engine.abort(s)
            raise
        return [s.output() for s in seqs]

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate(convs, sampling_params)

    def stream(
        self, prompt, sampling_params: SamplingParams | None = None, experts_top_k: int | None = None
    ) -> Iterator[str]:
        """Yields text as it is generated; the finished RequestOutput is the generator's return value."""
        (seq,) = self._submit([prompt], sampling_params or SamplingParams(), experts_top_k)
        try:
            while seq.finish_reason is None:
                self.engine.step()
                delta = seq.take_delta()
                if delta:
                    yield delta
        finally:
            if seq.finish_reason is None:
                self.engine.abort(seq)
        return seq.output()


def _as_batch(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict):
        return [prompts]  # one conversation
    return list(prompts)
