"""Create a random-weight Hugging Face ``qwen3_moe`` checkpoint plus a real tokenizer.

The benchmark only needs the *shape* of a real MoE model (the weights are random), but it needs a
tokenizer that transformers, moeflow and llama.cpp's converter all accept.  No model hub is
reachable here, so a byte-level BPE is trained on text that is always present: the Python
standard library sources of the running interpreter.

    python bench/make_checkpoint.py bench/.cache/qwen3moe-64e --dtype float32
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# Qwen-style special tokens; <|endoftext|> doubles as BOS/EOS/PAD like Qwen3 does.
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
# Enough text for a 32k vocab to fill up, small enough to train in well under a minute on 2 cores.
CORPUS_BUDGET_BYTES = 24 * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    return p.parse_args(argv)


def iter_corpus(budget_bytes: int = CORPUS_BUDGET_BYTES) -> Iterator[str]:
    """Yield stdlib source files (sorted, so the tokenizer is reproducible) up to a byte budget."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    used = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue  # third-party code varies between machines; keep the corpus stable
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        used += len(text)
        yield text
        if used >= budget_bytes:
            return


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE; llama.cpp's "gpt-2" pre-tokenizer matches it exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        # A short vocab would leave embedding rows no token maps to; converters pad these, but a
        # mismatch here usually means the corpus was missing, so fail loudly instead.
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
    )


def build_config(args: argparse.Namespace, eos_id: int):
    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate * args.top_k,  # dense-MLP size; unused (no mlp_only_layers)
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=args.dtype,
    )


def use_upstream_expert_key(config_path: Path) -> None:
    """Store the expert count as ``num_experts`` like released Qwen3-MoE checkpoints.

    transformers 5 serialises the attribute-mapped name ``num_local_experts``; tools that read
    config.json directly (llama.cpp's converter, other engines) expect the upstream key.
    """
    cfg = json.loads(config_path.read_text())
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out_dir
    if (out / "config.json").exists() and not args.force:
        print(f"{out} already has config.json; skipping (use --force to rebuild)")
        return 0
    if args.hidden % args.heads:
        sys.exit("--hidden must be divisible by --heads")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(args.vocab)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    print(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    config = build_config(args, eos_id)
    # Initialise directly in the target dtype so bf16 checkpoints never materialise an fp32 copy.
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.generation_config.bos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params initialised in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    use_upstream_expert_key(out / "config.json")
    print(f"saved to {out} in {time.perf_counter() - t0:.1f}s")
    print(json.dumps({k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "vocab_size")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
