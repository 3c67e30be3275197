"""Routing traces: which experts every token chose in every MoE layer (`moeflow-trace-v1`, .npz).

Arrays: experts int16 [T, L, K] (-1 = unused slot), weights float32 [T, L, K], tokens int32 [T],
seq int32 [T] (sequence of each token, in generation/prefill order), and meta: a 0-d array holding
a JSON object (see TraceMeta). Optional: lookahead float32 [L-1, E, H+1], the learned look-ahead
fitted on the traced text (store.learned), absent from traces recorded before it existed."""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import ConfigError

FORMAT = "moeflow-trace-v1"
ARRAYS = ("experts", "weights", "tokens", "seq", "meta")


@dataclass
class TraceMeta:
    model: str
    model_type: str
    moe_layers: list[int]
    n_experts: int
    top_k: int
    hidden: int
    expert_intermediate: int
    expert_bytes: int  # one expert at the checkpoint dtype: gate + up + down
    dtype: str
    format: str = FORMAT

    @classmethod
    def from_json(cls, text: str) -> TraceMeta:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"trace meta is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("trace meta is not a JSON object")
        if raw.get("format") != FORMAT:
            raise ConfigError(f"trace format is {raw.get('format')!r}; this moeflow reads {FORMAT!r}")
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise ConfigError(f"trace meta lacks {', '.join(missing)}")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


@dataclass
class Trace:
    experts: np.ndarray  # int16 [T, L, K], -1 = unused slot
    weights: np.ndarray  # float32 [T, L, K]
    tokens: np.ndarray  # int32 [T]
    seq: np.ndarray  # int32 [T]
    meta: TraceMeta
    lookahead: np.ndarray | None = None  # float32 [L-1, E, H+1]: the learned look-ahead's maps

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def width(self) -> int:
        """Most experts any token uses in one layer: what the cache must hold at once."""
        return int((self.experts >= 0).sum(-1).max()) if self.experts.size else 0

    def profile(self, n_tokens: int | None = None) -> np.ndarray:
        """[L, E] how often each expert was used (in the first n_tokens): a pinned hot set's input."""
        used = self.experts[:n_tokens]
        E = self.meta.n_experts
        return np.stack([np.bincount(used[:, i][used[:, i] >= 0], minlength=E) for i in range(self.n_layers)])

    def head(self, n: int) -> Trace:
        return Trace(
            self.experts[:n], self.weights[:n], self.tokens[:n], self.seq[:n], self.meta, self.lookahead
        )

    def validate(self) -> None:
        T = self.experts.shape[0] if self.experts.ndim == 3 else -1
        if self.experts.ndim != 3 or self.weights.shape != self.experts.shape:
            raise ConfigError(
                f"trace experts {self.experts.shape} / weights {self.weights.shape}: want [T, L, K]"
            )
        if self.tokens.shape != (T,) or self.seq.shape != (T,):
            raise ConfigError(f"trace tokens {self.tokens.shape} / seq {self.seq.shape}: want [{T}]")
        if T == 0:
            raise ConfigError("trace has no tokens")
        if self.n_layers != len(self.meta.moe_layers):
            raise ConfigError(f"trace has {self.n_layers} layers but meta lists {len(self.meta.moe_layers)}")
        lo, hi = int(self.experts.min()), int(self.experts.max())
        if lo < -1 or hi >= self.meta.n_experts:
            raise ConfigError(f"trace expert ids span {lo}..{hi}, outside -1..{self.meta.n_experts - 1}")
        if self.lookahead is not None and (
            self.lookahead.ndim != 3
            or self.lookahead.shape[:2] != (self.n_layers - 1, self.meta.n_experts)
            or self.lookahead.shape[2] != self.meta.hidden + 1
        ):
            raise ConfigError(
                f"trace lookahead maps are {list(self.lookahead.shape)}; want "
                f"[{self.n_layers - 1}, {self.meta.n_experts}, {self.meta.hidden + 1}]"
            )
        ordered = np.sort(self.experts, axis=-1)
        if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
            raise ConfigError("trace names one expert twice in a token's layer")


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in ARRAYS if a not in z.files]
            if missing:
                raise ConfigError(f"{path} is not a moeflow trace: no {', '.join(missing)} array")
            arrays = {a: z[a] for a in ARRAYS}
            lookahead = z["lookahead"].astype(np.float32, copy=False) if "lookahead" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"cannot read trace {path}: {e}") from None
    meta = TraceMeta.from_json(str(arrays.pop("meta")))
    trace = Trace(
        arrays["experts"].astype(np.int16, copy=False),
        arrays["weights"].astype(np.float32, copy=False),
        arrays["tokens"].astype(np.int32, copy=False),
        arrays["seq"].astype(np.int32, copy=False),
        meta,
        lookahead,
    )
    trace.validate()
    return trace


def save_trace(path: str | Path, trace: Trace) -> None:
    meta = np.array(json.dumps(asdict(trace.meta)))
    extra = {} if trace.lookahead is None else {"lookahead": trace.lookahead}
    np.savez_compressed(
        path,
        experts=trace.experts,
        weights=trace.weights,
        tokens=trace.tokens,
        seq=trace.seq,
        meta=meta,
        **extra,
    )
