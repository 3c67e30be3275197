"""The decode-step kernels (decode.c) against torch: RMSNorm rows, and one-token attention with
its cache write, for every dtype, GQA, ragged batches and a sliding window; and the model's
decode through them against its torch path."""

import pytest
import torch
import torch.nn.functional as F

from moeflow.engine.batch import StepBatch
from moeflow.kernels import native_decode, native_decode_attention, native_rmsnorm
from moeflow.layers.attention import attend

pytestmark = pytest.mark.skipif(native_decode() is None, reason="no native kernel on this machine")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulp(dtype) -> float:
    return {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 100), (2, 4, 64), (1, 7)])
def test_rmsnorm_matches_the_reference_within_one_rounding(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    want = w * F.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(dtype)  # the torch path of RMSNorm
    got = native_rmsnorm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # both round the normalised row and the product once: a few rounding steps apart at most
    diff = (got.float() - want.float()).abs()
    assert (diff <= 3 * ulp(dtype) * want.float().abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,heads,dim", [(1, 9, 64), (3, 2, 128), (2, 4, 6)])
def test_rope_is_bit_identical_to_the_torch_ops(monkeypatch, dtype, interleaved, T, heads, dim):
    from moeflow.layers import rope
    from moeflow.models.args import RopeArgs

    g = torch.Generator().manual_seed(T * heads + dim)
    r = rope.Rotary(RopeArgs(dim=dim, theta=10000.0, interleaved=interleaved))
    cos, sin = r.cos_sin(torch.tensor([5, 900, 33])[:T], dtype)
    x = (torch.randn(T, heads, dim, generator=g) * 4).to(dtype)
    got = r.apply(x, cos, sin)
    monkeypatch.setattr(rope, "native_decode", lambda: None)
    assert torch.equal(got, r.apply(x, cos, sin))


def reference(q, k, v, kc, vc, slots, lens, scale, window):
    """The torch path: the cache written by index, then the padded, masked attention."""
    B = q.shape[0]
    kc[slots, lens - 1], vc[slots, lens - 1] = k, v
    batch = StepBatch.build([[0]] * B, (lens - 1).tolist(), slots.tolist())
    L = int(lens.max())
    return attend(q, kc[slots, :L], vc[slots, :L], batch, scale, window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "h,kv,d,lens,window",
    [
        (9, 3, 64, [17], None),  # SmolLM2's geometry, one sequence
        (4, 4, 32, [1], None),  # the first token: attends to itself only
        (8, 2, 48, [5, 40, 1, 23], None),  # a ragged batch of four
        (6, 2, 16, [30, 9], 8),  # a sliding window shorter than one row's cache
        (16, 4, 128, [700], None),  # long enough to split heads over threads
    ],
)
def test_decode_attention_matches_the_torch_path(dtype, h, kv, d, lens, window):
    g = torch.Generator().manual_seed(h * 100 + d + len(lens))
    B, n_slots, max_len = len(lens), len(lens) + 2, max(lens) + 5
    slots = torch.randperm(n_slots, generator=g)[:B]
    lens = torch.tensor(lens)
    kc = torch.randn(n_slots, max_len, kv, d, generator=g).to(dtype)
    vc = torch.randn(n_slots, max_len, kv, d, generator=g).to(dtype)
    q, k, v = (torch.randn(B, n, d, generator=g).to(dtype) for n in (h, kv, kv))
    kc2, vc2 = kc.clone(), vc.clone()
    want = reference(q, k, v, kc2, vc2, slots, lens, d**-0.5, window)
    got = native_decode_attention(q, k, v, kc, vc, slots, lens, d**-0.5, window)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the same cache writes, and only those
    assert got.shape == (B, h * d) and got.dtype == dtype
    # fp32 probabilities here, the dtype's in torch's 16-bit attention: a few roundings apart
    scale = max(1.0, want.abs().max().item())
    assert (got.float() - want.float()).abs().max().item() <= 4 * ulp(dtype) * scale


def test_decode_attention_rejects_a_slot_out_of_range():
    kc = torch.zeros(2, 8, 1, 4)
    q, k = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    with pytest.raises(IndexError, match="out of range"):
        native_decode_attention(q, k, k, kc, kc.clone(), torch.tensor([2]), torch.tensor([3]), 1.0, None)
    with pytest.raises(IndexError, match="out of range"):
        native_decode_attention(q, k, k, kc, kc.clone(), torch.tensor([0]), torch.tensor([9]), 1.0, None)
    assert not kc.any()  # nothing written


def test_model_decode_matches_the_torch_path(checkpoint, monkeypatch):
    """Greedy fp32 decode of a tiny model, a ragged batch of three, with and without the kernels
    (in bf16 a random model's near-tied logits flip on a rounding step, which the kernel tests
    bound)."""
    from moeflow.layers import attention, norm
    from moeflow.llm import LLM, SamplingParams

    path, _ = checkpoint("qwen3_moe")
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 7], [3, 1], [8, 8, 4]]

    def run():
        llm = LLM(path, dtype="float32", progress=False)
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]

    fast = run()
    monkeypatch.setattr(attention, "native_decode", lambda: None)
    monkeypatch.setattr(norm, "native_decode", lambda: None)
    assert run() == fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden, inter", [(576, 192), (64, 36)])
def test_mlp_decode_token_is_the_expert_kernel_with_one_expert(dtype, hidden, inter):
    from moeflow.kernels import native_moe_token
    from moeflow.layers.mlp import MLP

    g = torch.Generator().manual_seed(hidden + inter)
    mlp = MLP(hidden, inter)
    for p in mlp.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.05).to(dtype)
    x = torch.randn(1, hidden, generator=g).to(dtype)
    with torch.inference_mode():
        got = mlp(x)  # one native call
        lin = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # the three linears
        w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        one = native_moe_token(x, torch.ones(1), [(w13, mlp.down_proj.weight)]).to(dtype)
    assert got.dtype == dtype and torch.equal(got, one)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got, lin, atol=tol, rtol=tol)
    two = torch.cat([x, x])  # a prefill's rows keep the linears
    with torch.inference_mode():
        torch.testing.assert_close(mlp(two)[1:], lin, atol=tol, rtol=tol)


def test_mlp_with_bias_keeps_the_linears():
    from moeflow.layers.mlp import MLP

    mlp = MLP(64, 32, bias=True)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        got = mlp(x)
        torch.testing.assert_close(got, mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def assert_one_call_decodes_as_separate_calls(path, dtype: str, monkeypatch) -> list[tuple[bool, bool]]:
    """Greedy decode of one sequence with MoE layers in one native call (MoEBlock._one_call)
    and with a call each: every MoE block's output equal bit for bit, and the one-call path
    taken. Returns its calls: (taken, routed inside the call)."""
    from moeflow.layers.moe import MoEBlock
    from moeflow.llm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 7]]  # one sequence: its decode steps are single tokens
    forward, one_call = MoEBlock.forward, MoEBlock._one_call
    calls, outputs = [], []

    def counted(self, x, weights, *args):
        out = one_call(self, x, weights, *args)
        calls.append((out is not None, weights is None))  # (taken, routed inside the call)
        return out

    def kept(self, x, ctx, layer):
        out = forward(self, x, ctx, layer)
        outputs.append(out.clone())
        return out

    def run():
        outputs.clear()
        llm = LLM(path, dtype=dtype, progress=False)
        tokens = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
        return tokens, list(outputs)

    monkeypatch.setattr(MoEBlock, "forward", kept)
    monkeypatch.setattr(MoEBlock, "_one_call", counted)
    fused_tokens, fused = run()
    assert any(taken for taken, _ in calls)
    monkeypatch.setattr(MoEBlock, "_one_call", lambda *a: None)
    tokens, separate = run()
    assert tokens == fused_tokens
    assert len(separate) == len(fused) and all(torch.equal(a, b) for a, b in zip(separate, fused))
    return calls


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_layer_in_one_call_decodes_as_the_separate_calls(checkpoint, monkeypatch, name, dtype):
    """Routed experts from the resident buffer and the shared expert, gated or not."""
    assert_one_call_decodes_as_separate_calls(checkpoint(name)[0], dtype, monkeypatch)


def test_one_call_follows_weights_that_moved(checkpoint):
    """The layer's prepared call is made again when a weight it reads is replaced (here the
    shared expert's, by assigning .data): the output follows the new weights."""
    from moeflow.layers.moe import MoEBlock
    from moeflow.llm import LLM

    llm = LLM(checkpoint("deepseek_v3")[0], dtype="float32", progress=False)
    lm = llm.loaded
    block = next(layer.mlp for layer in lm.model.model.layers if isinstance(layer.mlp, MoEBlock))
    layer = next(i for i, layer in enumerate(lm.model.model.layers) if layer.mlp is block)
    x = torch.randn(1, lm.args.hidden, generator=torch.Generator().manual_seed(0))
    weights, ids = torch.ones(1, block.m.top_k), torch.arange(block.m.top_k)[None]
    with torch.inference_mode():
        before = block._one_call(x, weights, ids, lm.experts, layer)
        down = block.shared_expert.down_proj.weight
        down.data = down.data * 2
        after = block._one_call(x, weights, ids, lm.experts, layer)
        block._calls.clear()
        fresh = block._one_call(x, weights, ids, lm.experts, layer)
    assert before is not None and not torch.equal(before, after)
    assert torch.equal(after, fresh)
