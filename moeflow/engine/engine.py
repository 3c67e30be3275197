"""The step loop: every step runs all admitted sequences together, prompts (in chunks) and decodes
mixed, so a new request joins the running batch at the next step (continuous batching)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from ..errors import ConfigError, PromptError
from ..layers.rope import Rotary
from ..loader.load import LoadedModel
from ..params import count_params
from .batch import StepBatch
from .context import ForwardContext
from .detokenize import Detokenizer
from .kv_cache import KVCache
from .sampling import SamplingParams, make_generator, sample
from .scheduler import Scheduler
from .sequence import Sequence


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        tokenizer,
        dtype: torch.dtype,
        device: str,
        max_model_len: int,
        max_num_seqs: int = 8,
        prefill_chunk: int = 512,
        step_tokens: int | None = None,
    ):
        """step_tokens: most tokens one forward step runs (default: prefill_chunk, or one more
        than max_num_seqs if that is larger, so every decode runs each step)."""
        self.m, self.tokenizer, self.dtype, self.device = loaded, tokenizer, dtype, device
        self.args = loaded.args
        self.max_model_len, self.max_num_seqs, self.prefill_chunk = max_model_len, max_num_seqs, prefill_chunk
        self.rotary = Rotary(self.args.attention.rope, device)
        self.cache: KVCache | None = None
        self.scheduler = Scheduler(step_tokens or max(prefill_chunk, max_num_seqs + 1), prefill_chunk)
        self._ids = itertools.count()
        self._params = count_params(self.args)

    def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        experts_top_k: int | None = None,
    ) -> Sequence:
        self.validate(prompt_ids, experts_top_k)
        eos = set() if params.ignore_eos else set(self.args.eos_token_ids) | self._tokenizer_eos()
        seq = Sequence(
            request_id=next(self._ids),
            prompt=prompt,
            prompt_ids=list(prompt_ids),
            params=params,
            generator=make_generator(params.seed),
            stop_ids=frozenset(eos | set(params.stop_token_ids)),
            counts=np.zeros((self.args.n_layers, self.args.moe.n_experts), dtype=np.int64),
            detok=Detokenizer(self.tokenizer),
            experts_top_k=experts_top_k,
        )
        seq.stats.total_params, seq.stats.active_params = self._params.total, self._params.active
        self.scheduler.add(seq)
        return seq

    def validate(self, prompt_ids: list[int], experts_top_k: int | None = None) -> None:
        """Raises for a request this engine can never serve; touches no state."""
        n_experts = self.args.moe.n_experts
        if experts_top_k is not None and not 0 < experts_top_k <= n_experts:
            raise ConfigError(f"experts top_k must be in 1..{n_experts}, got {experts_top_k}")
        if not prompt_ids:
            raise PromptError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptError(
                f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len} "
                f"(prompt plus at least one generated token)"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise PromptError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.args.vocab_size - 1})"
            )

    def _tokenizer_eos(self) -> set[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return {eos} if isinstance(eos, int) else set()

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self):
        return self.scheduler.running

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def reserve(self, n_slots: int, length: int) -> None:
        """Sizes the KV cache for the coming work; only reallocates while nothing is running."""
        n_slots, length = min(n_slots, self.max_num_seqs), min(length, self.max_model_len)
        c = self.cache
        if c is not None and c.n_slots >= n_slots and c.max_len >= length:
            return
        if self.running:
            return
        if c is not None:  # grow, never shrink below what was there
            n_slots, length = max(n_slots, c.n_slots), max(length, c.max_len)
        self.cache = KVCache.for_model(self.args, n_slots, length, self.dtype, self.device)

    def abort(self, seq: Sequence) -> None:
        """Drops a request and frees its KV slot at once (client gone, or the caller gave up)."""
        self.scheduler.abort(seq, self.cache)

    def _grow(self, length: int):
        self.reserve(self.cache.n_slots, length)
        return self.cache

    def step(self) -> list[Sequence]:
        """Runs one forward step; returns the sequences that produced a token (finished ones included)."""
        if self.cache is None:
            self.reserve(self.max_num_seqs, self.max_model_len)
        work = self.scheduler.schedule(self.cache, self._grow)
        if not work:
            return []
        seqs, rows = [s for s, _ in work], [r for _, r in work]
        batch = StepBatch.build(rows, [s.n_cached for s in seqs], [s.slot for s in seqs], self.device)
        shape = (len(seqs), self.args.n_layers, self.args.moe.n_experts)
        counts = torch.zeros(shape, dtype=torch.long, device=self.device)
        ks = [s.experts_top_k for s in seqs]
        row_top_k = None if all(k is None for k in ks) else [k or self.args.moe.top_k for k in ks]
        ctx = ForwardContext(batch, self.cache, self.m.experts, self.rotary, self.dtype, row_top_k, counts)
        t0 = time.perf_counter()
        logits = self.m.model(ctx).cpu()  # sampling and bookkeeping run on the host
        ctx.tally()
        dt = time.perf_counter() - t0
        counts = counts.cpu().numpy()
        produced = []
        for i, (s, row) in enumerate(zip(seqs, rows)):
            s.counts += counts[i]
            s.n_cached += len(row)
            if not s.output_ids:
                s.stats.prefill_s += dt
                if s.n_cached < len(s.prompt_ids):
                    continue  # more prompt chunks to go
                s.stats.prefill_tokens = len(s.prompt_ids)
            else:
                s.stats.decode_s += dt
                s.stats.decode_tokens += 1
            self._append(s, sample(logits[i], s.params, s.generator))
            produced.append(s)
        return produced

    def _append(self, s: Sequence, token: int) -> None:
        s.output_ids.append(token)
        if token in s.stop_ids:
            s.finish_reason = "stop"
        else:
            before = len(s.text)
            s.text += s.detok.add(token)
            self._check_stop_strings(s, before)
        if s.finish_reason is None and len(s.output_ids) >= s.params.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is None and s.n_cached + 1 >= self.cache.max_len:
            s.finish_reason = "length"
        if s.finish_reason is not None:
            self.scheduler.finish(s, self.cache)

    def _check_stop_strings(self, s: Sequence, before: int) -> None:
        if not s.params.stop:
            return
        longest = max(len(x) for x in s.params.stop)
        start = max(0, before - longest + 1)  # a stop string may straddle the old and new text
        hits = [i for i in (s.text.find(x, start) for x in s.params.stop) if i >= 0]
        if hits:
            s.text = s.text[: min(hits)]
            s.finish_reason = "stop"
