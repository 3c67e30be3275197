"""Every family against transformers on the same checkpoint, through one shared runner."""

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.engine.batch import StepBatch
from moeflow.engine.context import ForwardContext
from moeflow.engine.kv_cache import KVCache
from moeflow.layers.rope import Rotary
from moeflow.loader.load import load

from tiny_models import CONFIGS

PROMPT_LEN, DECODE_STEPS, GREEDY_STEPS = 16, 10, 32
GREEDY = SamplingParams(max_tokens=GREEDY_STEPS, temperature=0.0, ignore_eos=True)


def prompt(n: int, seed: int, vocab: int = 160) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def our_logits(lm, tokens: list[int], n_prefill: int) -> torch.Tensor:
    """Prefill n_prefill tokens in one step, then feed the rest one by one through the KV cache."""
    cache = KVCache.for_model(lm.args, 1, len(tokens), torch.float32)
    rotary = Rotary(lm.args.attention.rope)
    out, pos = [], 0
    chunks = [tokens[:n_prefill]] + [[t] for t in tokens[n_prefill:]]
    for chunk in chunks:
        ctx = ForwardContext(StepBatch.build([chunk], [pos], [0]), cache, lm.experts, rotary, torch.float32)
        out.append(lm.model(ctx, all_logits=True))
        pos += len(chunk)
    return torch.cat(out)


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoint, name, fused):
    if fused and CONFIGS[name][0] == "llama":
        pytest.skip("dense model: no expert layout to vary")
    folder, ref = checkpoint(name, fused)
    lm = load(folder, progress=False)
    tokens = prompt(PROMPT_LEN + DECODE_STEPS, seed=1)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0]
    got = our_logits(lm, tokens, PROMPT_LEN)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{name}: max |logit diff| {err:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_transformers(checkpoint, name):
    folder, ref = checkpoint(name)
    ids = prompt(PROMPT_LEN, seed=2)
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS, do_sample=False
        )[0, PROMPT_LEN:].tolist()
    out = LLM(folder, progress=False).generate(prompt_token_ids=[ids], sampling_params=GREEDY)[0]
    assert out.token_ids == want
    assert out.finish_reason == "length"


@pytest.mark.parametrize("name", ["mixtral-swa", "qwen2_moe", "deepseek_v3"])
def test_batch_equals_alone(checkpoint, name):
    folder, _ = checkpoint(name)
    llm = LLM(folder, progress=False)
    prompts = [prompt(n, seed=n) for n in (5, 17, 11)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for p, out in zip(prompts, together):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=params)[0]
        assert out.token_ids == alone.token_ids


def test_chunked_prefill_equals_one_shot(checkpoint):
    folder, _ = checkpoint("qwen3_moe")
    llm = LLM(folder, progress=False)
    p = prompt(40, seed=7)
    one = llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids
    llm.engine.prefill_chunk = 7
    assert llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids == one


def test_bf16_close_to_fp32(checkpoint):
    folder, ref = checkpoint("qwen3_moe")
    tokens = prompt(24, seed=3)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0]
    lm = load(folder, dtype=torch.bfloat16, progress=False)
    cache = KVCache.for_model(lm.args, 1, 32, torch.bfloat16)
    ctx = ForwardContext(
        StepBatch.build([tokens], [0], [0]), cache, lm.experts, Rotary(lm.args.attention.rope), torch.bfloat16
    )
    got = lm.model(ctx, all_logits=True)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, f"bf16 relative logit error {rel:.3f}"


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_mixed_per_request_top_k_equals_alone(checkpoint, name):
    folder, _ = checkpoint(name)
    llm = LLM(folder, progress=False)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts, ks = [prompt(9, seed=1), prompt(13, seed=2), prompt(6, seed=3)], [1, None, 2]
    seqs = [llm.engine.add(p, params, experts_top_k=k) for p, k in zip(prompts, ks)]
    while any(s.finish_reason is None for s in seqs):
        llm.engine.step()
    for p, k, s in zip(prompts, ks, seqs):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=params, experts_top_k=k)[0]
        assert s.output_ids == alone.token_ids
        assert (s.counts == alone.stats.expert_counts).all()
    top = llm.args.moe.top_k
    n = len(prompts[0]) + 7
    assert s.counts.sum() > 0 and seqs[0].counts[llm.args.moe_layers].sum() == n * len(llm.args.moe_layers)
    assert seqs[1].counts[llm.args.moe_layers].sum() == (len(prompts[1]) + 7) * top * len(llm.args.moe_layers)
