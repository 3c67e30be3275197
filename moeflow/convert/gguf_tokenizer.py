"""Builds a Hugging Face fast tokenizer from a GGUF file's tokenizer.ggml.* metadata (GPT-2 BPE)."""

from __future__ import annotations

from ..errors import UnsupportedModelError

_CONTROL = 3  # llama.cpp token type of special/control tokens


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default", None):
        return byte_level
    if pre == "smollm":  # digits split one by one, then GPT-2's regex
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported (gpt2, smollm)")


def tokenizer_from_gguf(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    field = lambda k: reader.fields[k].contents() if k in reader.fields else None  # noqa: E731
    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 BPE)")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    name = lambda key: None if field(key) is None else tokens[field(key)]  # noqa: E731
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("tokenizer.ggml.bos_token_id"),
        eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token")),
    )
    fast.chat_template = field("tokenizer.chat_template")
    return fast
