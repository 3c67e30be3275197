"""Tokenizer and chat template, from the checkpoint folder's own files."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, PromptError

_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: Path):
    """Returns a transformers tokenizer, or None when the folder has no tokenizer files."""
    if not any((path / f).exists() for f in _FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # it warns about model types it does not know (ours); not a fault
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None
    finally:
        logging.set_verbosity(level)


def encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise PromptError("this checkpoint has no tokenizer: pass prompt_token_ids instead of text")
    return tokenizer.encode(text, add_special_tokens=True)


def apply_chat(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    if tokenizer is None:
        raise PromptError("this checkpoint has no tokenizer, so chat messages cannot be encoded")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this tokenizer has no chat template; send a plain prompt instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer.encode(text, add_special_tokens=False)
