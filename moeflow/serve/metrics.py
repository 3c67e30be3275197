"""Prometheus metrics: the serving numbers vLLM users expect plus MoE expert activations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.sequence import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class Metrics:
    def __init__(self, n_layers: int, moe_layers: list[int], n_experts: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moeflow_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r
        )
        self.running = Gauge("moeflow_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("moeflow_requests_waiting", "Sequences waiting for a KV slot", registry=r)
        self.kv_free = Gauge("moeflow_kv_slots_free", "Free KV-cache slots", registry=r)
        self.aborted = Gauge(
            "moeflow_requests_aborted", "Requests dropped because the client left", registry=r
        )
        self.prompt_tokens = Counter("moeflow_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("moeflow_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "moeflow_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "moeflow_inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.experts = Counter(
            "moeflow_expert_activations", "Tokens routed to each expert", ["layer", "expert"], registry=r
        )
        self._moe_layers, self._n_experts = moe_layers, n_experts
        # a tiered expert store's counters, advanced by what changed since the last step
        self.store = {
            key: Counter(f"moeflow_expert_cache_{key}", text, registry=r)
            for key, text in (
                ("hits", "Expert accesses served from the in-memory cache"),
                ("misses", "Expert accesses that waited for a read from disk"),
                ("prefetches", "Experts read ahead of their use by the predictor"),
                ("bytes_read", "Expert bytes read from the checkpoint files"),
                ("stall_s", "Seconds the model waited for expert reads"),
                ("store_s", "Seconds the model's thread spent in the expert store, waits included"),
            )
        }
        self._store_seen = dict.fromkeys(self.store, 0.0)

    def on_token(self, handle, now: float) -> None:
        if handle.first_token is None:
            self.ttft.observe(now - handle.submitted)
        else:
            self.itl.observe(now - handle.last_token)

    def on_finish(self, out: RequestOutput) -> None:
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        counts = out.stats.expert_counts
        for layer in self._moe_layers:
            for e in range(self._n_experts):
                if counts[layer, e]:
                    self.experts.labels(str(layer), str(e)).inc(int(counts[layer, e]))

    def on_step(self, engine_thread) -> None:
        self.running.set(engine_thread.running)
        self.waiting.set(engine_thread.waiting)
        self.kv_free.set(engine_thread.engine.cache.free_slots if engine_thread.engine.cache else 0)
        self.aborted.set(engine_thread.aborted)
        report = getattr(engine_thread.engine.m.experts, "report", None)
        if report is not None:
            now = report()
            for key, counter in self.store.items():
                counter.inc(max(0.0, now[key] - self._store_seen[key]))
                self._store_seen[key] = now[key]

    def render(self) -> bytes:
        return generate_latest(self.registry)
