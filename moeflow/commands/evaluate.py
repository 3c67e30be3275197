"""`moeflow eval perplexity`: a model's perplexity on a text, optionally with fewer experts."""

from __future__ import annotations

import json
import sys

from ..corpus import read_text
from ..eval.perplexity import perplexity
from ..llm import resolve_device, resolve_dtype
from ..loader.open import open_model
from ..store.config import StoreConfig
from ..tokenizer import encode
from .format import add_store_args


def add_model_source(p) -> None:
    p.add_argument("--model", help="checkpoint folder or dense .gguf (default: the built-in model)")
    p.add_argument(
        "--text", required=True, help="UTF-8 text file, or builtin:evaluation / builtin:calibration"
    )
    p.add_argument("--window", type=int, default=512, help="tokens per window (no overlap)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the model's)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    add_store_args(p)


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="quality measurements")
    kinds = e.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("perplexity", help="perplexity on a text")
    add_model_source(p)
    p.add_argument("--json", action="store_true")


def open_for_text(a):
    """Model, tokenizer and token ids of --text, from the shared flags."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model is None:
        from ..default_model import default_model_path

        a.model = default_model_path()
    dtype, device = resolve_dtype(a.dtype), resolve_device(a.device)
    text = read_text(a.text)
    store = StoreConfig(
        a.expert_memory,
        a.expert_policy,
        a.expert_scope,
        a.prefetch,
        trace=a.expert_trace,
        host_memory=a.host_memory,
        on_miss=a.on_miss,
        io=a.expert_io,
        io_threads=a.io_threads,
    )
    lm, tok = open_model(a.model, dtype, device, sys.stderr.isatty(), store)
    return lm, dtype, encode(tok, text)


def run(a) -> int:
    lm, dtype, ids = open_for_text(a)
    r = perplexity(lm, ids, a.window, a.max_tokens, a.top_k, dtype, progress=sys.stderr.isatty())
    if a.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    k = f"top-{r.top_k}" if r.top_k else f"top-{lm.args.moe.top_k} (model default)"
    print(
        f"perplexity {r.perplexity:.3f} (nll {r.nll:.4f}) over {r.tokens} tokens in {r.windows} windows "
        f"of {r.window} | experts {k if lm.args.moe_layers else 'n/a (dense)'} | {r.seconds:.1f} s"
    )
    return 0
