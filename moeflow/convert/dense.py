"""A dense Llama-family model in memory: HF config dict, HF-named fp32 tensors and a tokenizer.
Read from a GGUF file or a safetensors folder, written back as a plain HF folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, UnsupportedModelError
from ..loader.checkpoint import Checkpoint
from ..tokenizer import load_tokenizer
from .aligned import align_data

DENSE_TYPES = ("llama",)


@dataclass
class DenseModel:
    config: dict  # HF config.json contents
    tensors: dict[str, torch.Tensor]  # HF names, fp32
    tokenizer: object | None  # a transformers fast tokenizer
    source: str

    @property
    def n_layers(self) -> int:
        return self.config["num_hidden_layers"]

    def ffn(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [F, H], up [F, H], down [H, F] of one layer."""
        p = f"model.layers.{layer}.mlp."
        return tuple(self.tensors[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))


def read_dense(src: str | Path) -> DenseModel:
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    if path.is_file():
        raise CheckpointError(f"{path} is neither a .gguf file nor a checkpoint folder")
    ckpt = Checkpoint(path)
    kind = ckpt.config.get("model_type")
    if kind not in DENSE_TYPES:
        raise UnsupportedModelError(
            f"dense-to-moe needs a dense Llama-family model; {path} has model_type {kind!r}"
        )
    tensors = {k: ckpt.get(k).float() for k in ckpt.keys()}
    if ckpt.config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    return DenseModel(ckpt.config, tensors, load_tokenizer(ckpt.path), str(path))


def write_folder(out: Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer) -> None:
    """Writes config.json, model.safetensors and the tokenizer files; atomically via a temp folder."""
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    align_data(tmp / "model.safetensors")  # experts readable straight into cache slots
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        raise CheckpointError(f"output folder already exists: {out}")
    tmp.rename(out)
