"""A model source by path: a checkpoint folder, or a dense Llama .gguf file read into memory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..store.config import StoreConfig
from ..tokenizer import load_tokenizer
from .checkpoint import MemoryCheckpoint
from .load import LoadedModel, load


def open_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
    store: StoreConfig | None = None,
) -> tuple[LoadedModel, object]:
    """Returns the loaded model and its tokenizer (None when the source has none)."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        from ..convert.gguf import read_gguf

        dense = read_gguf(p, progress)
        return load(
            MemoryCheckpoint(dense.config, dense.tensors, p), dtype, device, progress
        ), dense.tokenizer
    lm = load(p, dtype, device, progress, store)
    return lm, load_tokenizer(lm.path)
