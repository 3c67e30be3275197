import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.engine.sampling import _top_p


@pytest.fixture(scope="module")
def llm(chat_model):
    return LLM(chat_model, progress=False)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert torch.equal(_top_p(probs, 0.6), torch.tensor([0.0, 0.5, 0.3]))
    assert torch.equal(_top_p(probs, 0.5), torch.tensor([0.0, 0.5, 0.0]))


def test_seed_repeats_and_differs(llm):
    def run(seed):
        p = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        return llm.generate("The weather", p)[0].token_ids

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate("Once upon", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[
        0
    ].token_ids
    k1 = SamplingParams(max_tokens=16, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    p0 = SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)
    assert llm.generate("Once upon", k1)[0].token_ids == greedy
    assert llm.generate("Once upon", p0)[0].token_ids == greedy


def test_stop_token_id(llm):
    base = llm.generate("A list:", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    stop = base[6]
    first = base.index(stop)
    out = llm.generate("A list:", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base[: first + 1]


def test_stop_string_truncates_text(llm):
    full = llm.generate("Functions", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    out = llm.generate(
        "Functions", SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_stream_equals_generate(llm):
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    whole = llm.generate("Streaming", p)[0].text
    gen = llm.stream("Streaming", p)
    parts = []
    while True:
        try:
            parts.append(next(gen))
        except StopIteration as done:
            final = done.value
            break
    assert "".join(parts) == whole == final.text


def test_context_limit_ends_with_length(chat_model):
    llm = LLM(chat_model, max_model_len=12, progress=False)
    out = llm.generate("one two three", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 12


def test_runtime_top_k_changes_activation_counts(llm):
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    full = llm.generate("Experts", p)[0]
    one = llm.generate("Experts", p, experts_top_k=1)[0]
    n = len(full.prompt_token_ids) + 3  # tokens that went through the model
    assert (full.stats.expert_counts.sum(axis=1) == 4 * n).all()
    assert (one.stats.expert_counts.sum(axis=1) == n).all()


def test_chat_messages(llm):
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    assert len(out) == 1 and len(out[0].token_ids) == 4
    assert "<|im_start|>assistant" in out[0].prompt


def test_rejected_batch_keeps_other_queued_work(llm):
    from moeflow.errors import PromptError

    queued = llm.engine.add([5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    with pytest.raises(PromptError):
        llm.generate(["fine", "word " * 5000], SamplingParams(max_tokens=2))
    assert list(llm.engine.waiting) == [queued]  # nothing of the bad batch queued, the other kept
    while queued.finish_reason is None:
        llm.engine.step()
    assert len(queued.output_ids) == 2
