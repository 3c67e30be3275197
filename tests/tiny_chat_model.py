"""A tiny random-weight Qwen3-MoE with a real tokenizer and chat template, for fast tests of the
engine, CLI and server: a byte-level BPE trained on Python's own docstrings. Its text is noise."""

from __future__ import annotations

import pydoc
import sys
from pathlib import Path

from tqdm import tqdm

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """Docstrings of standard-library modules: real English and code, present on every Python."""
    texts = []
    for name in sorted(sys.stdlib_module_names):
        mod = sys.modules.get(name)
        doc = pydoc.getdoc(mod) if mod else ""
        if doc:
            texts.append(doc)
    import builtins

    texts += [pydoc.getdoc(getattr(builtins, n)) for n in dir(builtins)]
    return [t for t in texts if t]


def build(path: Path, progress: bool = True) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tmp = path.with_name(path.name + ".partial")
    steps = tqdm(total=3, desc=f"building default model in {path}", disable=not progress)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None, pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    steps.update()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        initializer_range=0.05,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    steps.update()
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(path)
    steps.update()
    steps.close()
