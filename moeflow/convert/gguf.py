"""Reads a dense Llama GGUF (as made by llama.cpp's converter) into HF names and layout.

llama.cpp stores attn_q/attn_k with the rows of each head permuted for its rope kernel (pairs
interleaved); HF rotates halves, so those two matrices are permuted back here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError, UnsupportedModelError
from .dense import DenseModel

# types whose dequantisation is exercised by the tests; others are refused by name
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if parts[0] != "blk" or parts[2] not in _NAMES:
        raise UnsupportedModelError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
    return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's interleaved-pair row order per head -> HF's half-split order."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _dequantize(t) -> torch.Tensor:
    from gguf import quants

    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
    arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)  # owned, writable copy


def _check_types(reader) -> None:
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED:
            raise UnsupportedModelError(
                f"tensor {t.name} has GGUF type {t.tensor_type.name}, which moeflow cannot read "
                f"(supported: {', '.join(SUPPORTED)})"
            )


def _config(reader, has_output: bool) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (llama)")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if g(key) is None:
            raise CheckpointError(f"GGUF metadata lacks llama.{key}")
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = g("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError("GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "head_dim": int(g("rope.dimension_count", hidden // n_heads)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(g("rope.freq_base", 10000.0))},
        "hidden_act": "silu",
        "tie_word_embeddings": not has_output,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }


def _open(path: Path):
    from gguf import GGUFReader

    if not path.exists():
        raise CheckpointError(f"model path does not exist: {path}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors for broken files
        raise CheckpointError(f"{path.name} is not a readable GGUF file ({e})") from None


def read_gguf(path: Path, progress: bool = True) -> DenseModel:
    from .gguf_tokenizer import tokenizer_from_gguf

    reader = _open(path)
    _check_types(reader)  # before any slow work
    names = [t.name for t in reader.tensors]
    cfg = _config(reader, "output.weight" in names)
    tensors = {}
    for t in tqdm(reader.tensors, desc="reading GGUF", unit="tensor", disable=not progress, leave=False):
        w = _dequantize(t)
        name = hf_name(t.name)
        if ".q_proj." in name:
            w = unpermute(w, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            w = unpermute(w, cfg["num_key_value_heads"])
        tensors[name] = w
    return DenseModel(cfg, tensors, tokenizer_from_gguf(reader), str(path))
