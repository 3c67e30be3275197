import os
from pathlib import Path

import pytest
import torch

from tiny_models import build_reference, save

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, fused=False) -> (folder, reference model); built once per session."""
    made: dict = {}

    def get(name: str, fused: bool = False):
        key = (name, fused)
        if key not in made:
            ref = build_reference(name)
            folder = tmp_path_factory.mktemp(f"{name}-{'fused' if fused else 'split'}")
            made[key] = (save(ref, Path(folder), fused), ref)
        return made[key]

    return get


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny random Qwen3-MoE with a tokenizer and chat template, built once per session."""
    from moeflow.convert.aligned import align_data

    from tiny_chat_model import build

    path = tmp_path_factory.mktemp("chat-model") / "model"
    build(path, progress=False)
    for f in path.glob("*.safetensors"):  # as moeflow's converter writes them: experts read in place
        align_data(f)
    return path
