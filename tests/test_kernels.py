"""The native kernels against a float64 reference, for every weight dtype and awkward shapes."""

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels import (
    LayerCall,
    TopLogits,
    experts_usable,
    layer_usable,
    native,
    native_linear,
    native_mlp_token,
    native_moe_token,
)
from moeflow.layers.experts import run_experts

pytestmark = pytest.mark.skipif(native() is None, reason="no native kernel on this machine")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 8, 15])
@pytest.mark.parametrize("N,K", [(5, 7), (64, 1024), (12, 48), (33, 100)])
def test_linear(dtype, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    W = torch.randn(N, K, generator=g).to(dtype)
    X = torch.randn(M, K, generator=g)
    want = X.double() @ W.double().t()
    got = native_linear(X, W).double()
    assert (got - want).abs().max().item() < 1e-3 * K**0.5


def expert_ref(x, scale, experts):
    out = torch.zeros(x.shape[-1], dtype=torch.float64)
    for s, (w13, w2) in zip(scale.tolist(), experts):
        g, u = (w13.double() @ x[0].double()).chunk(2)
        out += s * (w2.double() @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,I,n", [(64, 32, 2), (1024, 512, 8), (48, 20, 3), (96, 40, 1)])
def test_moe_token(dtype, H, I, n):
    g = torch.Generator().manual_seed(H + I + n)
    experts = [
        (
            (torch.randn(2 * I, H, generator=g) / H**0.5).to(dtype),
            (torch.randn(H, I, generator=g) / I**0.5).to(dtype),
        )
        for _ in range(n)
    ]
    x = torch.randn(1, H, generator=g)
    scale = torch.rand(n, generator=g)
    assert experts_usable(x, experts[0][0])
    got = native_moe_token(x, scale, experts)[0].double()
    assert (got - expert_ref(x, scale, experts)).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("late", [[0], [3], [1, 2], [0, 4, 7], list(range(8))])
def test_moe_token_with_late_experts_is_bit_identical(dtype, late):
    """A token whose late experts are computed after settle() (a store still reading them) gets
    bit for bit the one-call result; settle runs once, after the others are computed."""
    g = torch.Generator().manual_seed(len(late) * 10 + late[0])
    H, I, n = 96, 40, 8
    experts = [
        (
            (torch.randn(2 * I, H, generator=g) / H**0.5).to(dtype),
            (torch.randn(H, I, generator=g) / I**0.5).to(dtype),
        )
        for _ in range(n)
    ]
    x, scale = torch.randn(1, H, generator=g), torch.rand(n, generator=g)
    real = [(a.clone(), b.clone()) for a, b in experts]
    for e in late:  # "still being read": garbage until settle() puts the weights in place
        experts[e][0].fill_(float("nan"))
        experts[e][1].fill_(float("nan"))
    settled = []

    def settle():
        settled.append(True)
        for e in late:
            experts[e][0].copy_(real[e][0])
            experts[e][1].copy_(real[e][1])

    got = native_moe_token(x, scale, experts, late, settle)
    assert settled == [True]
    assert torch.equal(got, native_moe_token(x, scale, real))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_width", [0, 48, 100])
@pytest.mark.parametrize("apart", [False, True])
def test_moe_layer_token_is_the_separate_calls_bit_for_bit(dtype, shared_width, apart):
    """A whole layer in one call (experts read from one buffer by id, the shared expert after)
    gives the routed sum of native_moe_token and the shared output of native_mlp_token exactly,
    summed as torch sums them or handed back apart."""
    g = torch.Generator().manual_seed(shared_width + 7 * apart)
    E, H, I, k = 7, 96, 40, 3
    layer = (torch.randn(E, 3 * I * H, generator=g) / 8).to(dtype)
    w13, w2 = layer[:, : 2 * I * H].view(E, 2 * I, H), layer[:, 2 * I * H :].view(E, H, I)
    shared = None
    if shared_width:
        shared = tuple(
            (torch.randn(*shape, generator=g) / 8).to(dtype)
            for shape in ((shared_width, H), (shared_width, H), (H, shared_width))
        )
    x = torch.randn(1, H, generator=g)
    ids, scale = torch.tensor([5, 0, 6]), torch.rand(k, generator=g)
    assert layer_usable(x, layer, I, shared)
    out, apart_out = LayerCall(layer, I, shared)(x, scale, ids, apart)
    routed = native_moe_token(x, scale, [(w13[e], w2[e]) for e in ids.tolist()])
    if shared is None:
        assert apart_out is None and torch.equal(out, routed)
    elif apart:
        assert torch.equal(out, routed) and torch.equal(apart_out, native_mlp_token(x, *shared))
    else:
        assert apart_out is None and torch.equal(out, routed + native_mlp_token(x, *shared))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [1, 2, 5, 7, 13])
@pytest.mark.parametrize("H", [40, 96, 264])
@pytest.mark.parametrize("router_case", ["random", "ties", "nan"])
def test_moe_layer_token_routes_as_the_router_and_topk_sum(dtype, E, H, router_case):
    """Routing inside the call picks what Router.forward (native_linear for one token) and
    topk_sum pick, in the same order, ties and NaN logits included, and computes those experts
    as native_moe_token does."""
    from moeflow.layers.routing import topk_sum

    g = torch.Generator().manual_seed(E * 1000 + H)
    I, k = 8, min(3, E)
    layer = (torch.randn(E, 3 * I * H, generator=g) / 8).to(dtype)
    router = torch.randn(E, H, generator=g)
    if router_case == "ties":
        router[:] = 0  # every logit exactly equal
    elif router_case == "nan":
        router[E // 2, 0] = float("nan")
    x = torch.randn(1, H, generator=g)
    ids = torch.empty(k, dtype=torch.int64)
    out, _ = LayerCall(layer, I, None, router)(x, torch.ones(k), ids)
    want = topk_sum(native_linear(x, router), k)[1][0]
    assert ids.tolist() == want.tolist()
    if router_case == "ties":
        assert ids.tolist() == list(range(k))
    w13, w2 = layer[:, : 2 * I * H].view(E, 2 * I, H), layer[:, 2 * I * H :].view(E, H, I)
    assert torch.equal(out, native_moe_token(x, torch.ones(k), [(w13[e], w2[e]) for e in ids.tolist()]))


def test_moe_layer_token_refuses_what_it_cannot_read():
    H, I = 96, 40
    layer = torch.zeros(4, 3 * I * H)
    x = torch.zeros(1, H)
    assert not layer_usable(torch.zeros(2, H), layer, I, None)  # a prefill's rows
    assert not layer_usable(x, layer.double(), I, None)
    shared = (torch.zeros(48, H, dtype=torch.bfloat16), torch.zeros(48, H), torch.zeros(H, 48))
    assert not layer_usable(x, layer, I, shared)  # a shared expert in another dtype
    assert not layer_usable(x, layer, I, tuple(torch.zeros(*s) for s in ((50, H), (50, H), (H, 50))))


def test_grouped_experts_equal_token_by_token():
    """The grouped path (many tokens) and the fused one-token path agree."""
    g = torch.Generator().manual_seed(0)
    E, H, I, T, K = 6, 64, 32, 9, 2
    w13 = torch.randn(E, 2 * I, H, generator=g) / 8
    w2 = torch.randn(E, H, I, generator=g) / 8

    def fetch(ids):
        return [(w13[e], w2[e]) for e in ids]

    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    together = run_experts(x, w, ids, fetch)
    alone = torch.cat([run_experts(x[t : t + 1], w[t : t + 1], ids[t : t + 1], fetch) for t in range(T)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[1], [2, 3], [5, 1, 4, 7], [16, 2]])
def test_moe_grouped(dtype, counts):
    from moeflow.kernels import native_moe_grouped

    H, I = 96, 40
    g = torch.Generator().manual_seed(sum(counts))
    experts = [
        (
            (torch.randn(2 * I, H, generator=g) / H**0.5).to(dtype),
            (torch.randn(H, I, generator=g) / I**0.5).to(dtype),
        )
        for _ in counts
    ]
    xs = torch.randn(sum(counts), H, generator=g)
    assert experts_usable(xs, experts[0][0])
    got = native_moe_grouped(xs, experts, counts).double()
    start = 0
    for n, pair in zip(counts, experts):
        for p in range(start, start + n):
            want = expert_ref(xs[p : p + 1], torch.ones(1), [pair])
            assert (got[p] - want).abs().max().item() < 1e-4
        start += n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "E,H,k,bias", [(32, 576, 10, False), (32, 576, 8, True), (5, 13, 5, True), (64, 100, 1, False)]
)
def test_top_logits_pick_what_torch_topk_picks(dtype, E, H, k, bias):
    """The look-ahead's one-call guess: the same experts, best first, as linear + topk."""
    g = torch.Generator().manual_seed(E + H + k)
    top = TopLogits(E, H, k)
    for _ in range(20):
        w, x = torch.randn(E, H, generator=g), torch.randn(1, H, generator=g).to(dtype)
        b = torch.randn(E, generator=g) if bias else None
        want = torch.topk(F.linear(x.float(), w, b), k).indices[0].tolist()
        assert top(x, w, b) == want


def test_top_logits_skip_nan():
    """A NaN logit is never guessed while finite ones remain (a guess only orders reads)."""
    w, x = torch.eye(4), torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert TopLogits(4, 4, 3)(x, w, torch.tensor([0.0, float("nan"), 0.0, 0.0])) == [2, 3, 0]
