"""model_type -> family module. A family module exports args_from_config, route and sanitize."""

import importlib
from types import ModuleType

from ..errors import CheckpointError, UnsupportedModelError
from .args import ModelArgs

FAMILIES = (
    "llama",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "moeflow_llama_moe",
)


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return importlib.import_module(f".{model_type}", __package__)


def parse_args(cfg: dict) -> tuple[ModelArgs, ModuleType]:
    if "model_type" not in cfg:
        raise CheckpointError("config.json has no model_type")
    fam = family(cfg["model_type"])
    try:
        return fam.args_from_config(cfg), fam
    except KeyError as e:
        raise CheckpointError(f"config.json is missing {e.args[0]!r} needed by {cfg['model_type']}") from None
