"""Dense -> MoE conversion against transformers' dense Llama (the reference we did not write)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_decode_kernels import assert_one_call_decodes_as_separate_calls

from moeflow.convert.dense import read_dense
from moeflow.convert.dense_to_moe import convert
from moeflow.convert.moefy import ConvertConfig
from moeflow.engine.batch import StepBatch
from moeflow.engine.context import ForwardContext
from moeflow.engine.kv_cache import KVCache
from moeflow.layers.rope import Rotary
from moeflow.loader.load import load

from test_cli_errors import assert_clean_error, cli
from test_parity import our_logits, prompt

WIDTH = 96  # tiny llama's intermediate_size


def calibration(n: int = 1024) -> list[int]:
    return prompt(n, seed=7)


@pytest.fixture(scope="module")
def dense(checkpoint):
    folder, ref = checkpoint("llama")
    return read_dense(folder), ref


def converted(dense_model, tmp_path, **kw):
    cfg = ConvertConfig(calibration_tokens=1024, **kw)
    out = tmp_path / "moe"
    convert(dense_model, out, cfg, calibration(), progress=False)
    return out


@pytest.mark.parametrize("shared", [0, 2])
def test_all_experts_equal_the_dense_model(dense, tmp_path, shared):
    model, ref = dense
    out = converted(model, tmp_path, experts=8, top_k=8 - shared, shared=shared, distill=True)
    tokens = prompt(26, seed=1)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0]
    got = our_logits(load(out, progress=False), tokens, 16)
    assert (got - want).abs().max().item() <= 1e-4


def test_bfloat16_checkpoint(dense, tmp_path):
    """--dtype bfloat16 stores experts and dense weights in bf16, routers and norms in fp32, and
    computes what the fp32 conversion computes up to bf16 rounding of the weights (all experts
    routed, so a rounding cannot flip a routing choice)."""
    model, _ = dense
    full = converted(model, tmp_path / "f32", experts=8, top_k=8)
    half = converted(model, tmp_path / "bf16", experts=8, top_k=8, dtype="bfloat16")
    w = load_file(str(half / "model.safetensors"))
    assert w["model.layers.0.mlp.experts.0.down_proj.weight"].dtype == torch.bfloat16
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert w["model.layers.0.mlp.gate.weight"].dtype == torch.float32
    assert w["model.norm.weight"].dtype == torch.float32
    tokens = prompt(26, seed=1)
    want = our_logits(load(full, progress=False), tokens, 16)
    got = our_logits(load(half, progress=False), tokens, 16)
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()


def test_experts_partition_the_dense_neurons(dense, tmp_path):
    model, _ = dense
    out = converted(model, tmp_path, experts=8, top_k=3, shared=1)
    w = load_file(str(out / "model.safetensors"))
    gate = model.tensors["model.layers.0.mlp.gate_proj.weight"]
    parts = [w["model.layers.0.mlp.shared_expert.gate_proj.weight"]]
    parts += [w[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(7)]
    rows = torch.cat(parts)
    assert rows.shape == gate.shape and all(p.shape[0] == WIDTH // 8 for p in parts)
    order = [int((gate == r).all(1).nonzero()[0, 0]) for r in rows]
    assert sorted(order) == list(range(WIDTH)), "each dense neuron sits in exactly one expert"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (7, 3, 12)


def direct_moe(w: dict, layer: int, x: torch.Tensor, k: int, n_experts: int) -> torch.Tensor:
    """The converted layer written out by hand: top-k experts by router logit, outputs summed."""
    p = f"model.layers.{layer}.mlp."
    ids = (x @ w[p + "gate.weight"].T).topk(k, dim=1).indices
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in ids[t].tolist():
            g, u, d = (w[f"{p}experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
            out[t] += d @ (F.silu(g @ x[t]) * (u @ x[t]))
    if p + "shared_expert.gate_proj.weight" in w:
        g, u, d = (w[f"{p}shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down"))
        out += (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    return out


@pytest.mark.parametrize("distill", [False, True])
def test_fewer_experts_match_a_direct_computation(dense, tmp_path, distill):
    model, _ = dense
    out = converted(model, tmp_path, experts=8, top_k=3, shared=1, distill=distill)
    lm = load(out, progress=False)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    batch = StepBatch.build([list(range(12))], [0], [0])
    ctx = ForwardContext(
        batch,
        KVCache.for_model(lm.args, 1, 12, torch.float32),
        lm.experts,
        Rotary(lm.args.attention.rope),
        torch.float32,
    )
    for layer in (0, 1):
        got = lm.model.model.layers[layer].mlp(x, ctx, layer)
        want = direct_moe(load_file(str(out / "model.safetensors")), layer, x, 3, 7)
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("first_dense", [0, 1])
def test_converted_layer_routes_inside_its_one_call(dense, tmp_path, monkeypatch, dtype, first_dense):
    """A converted model's decode token routes inside the layer's native call (plain top-k of
    the router logits, 7 routed experts: a router width that is not a multiple of four) and
    gives the separate calls' outputs exactly, first layer dense or not."""
    model, _ = dense
    out = converted(model, tmp_path, experts=8, top_k=3, shared=1, dense_layers=first_dense)
    calls = assert_one_call_decodes_as_separate_calls(out, dtype, monkeypatch)
    assert (True, True) in calls  # taken, and routed natively


def test_fewer_experts_change_the_output_and_runtime_top_k_restores_it(dense, tmp_path):
    """K < E is a real approximation; asking for all experts at run time gives the dense model back."""
    from moeflow import LLM, SamplingParams

    model, ref = dense
    out = converted(model, tmp_path, experts=8, top_k=2)
    tokens = prompt(16, seed=2)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0, -1]
    llm = LLM(out, progress=False)
    assert llm.generate(prompt_token_ids=[tokens], sampling_params=SamplingParams(max_tokens=1))
    lm = load(out, progress=False)
    full = our_logits(lm, tokens, 16)[-1]
    assert (full - want).abs().max().item() > 1e-3, "top-2 of 8 should not equal the dense model"
    cache = KVCache.for_model(lm.args, 1, 16, torch.float32)
    ctx = ForwardContext(
        StepBatch.build([tokens], [0], [0]),
        cache,
        lm.experts,
        Rotary(lm.args.attention.rope),
        torch.float32,
        row_top_k=[8],
    )
    assert (lm.model(ctx)[0] - want).abs().max().item() <= 1e-4


def test_first_layers_kept_dense(dense, tmp_path):
    """--dense-layers 1: layer 0 keeps the dense FFN's own tensors (no router, no experts) and is
    computed as the dense FFN; the other layers are routed as usual (checked by hand); with every
    expert routed at run time the model is the dense one again."""
    model, ref = dense
    out = converted(model, tmp_path, experts=8, top_k=3, shared=1, dense_layers=1)
    w = load_file(str(out / "model.safetensors"))
    for n in ("gate", "up", "down"):
        name = f"model.layers.0.mlp.{n}_proj.weight"
        assert torch.equal(w[name], model.tensors[name])
    assert not any(k.startswith("model.layers.0.mlp.") and ("experts" in k or ".gate." in k) for k in w)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["first_k_dense_replace"] == 1
    lm = load(out, progress=False)
    n_layers = lm.args.n_layers
    assert lm.args.moe_layers == list(range(1, n_layers))
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    g, u, d = (model.tensors[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    assert (lm.model.model.layers[0].mlp(x) - (F.silu(x @ g.T) * (x @ u.T)) @ d.T).abs().max().item() <= 1e-5
    ctx = ForwardContext(
        StepBatch.build([list(range(12))], [0], [0]),
        KVCache.for_model(lm.args, 1, 12, torch.float32),
        lm.experts,
        Rotary(lm.args.attention.rope),
        torch.float32,
    )
    want = direct_moe(w, 1, x, 3, 7)
    assert (lm.model.model.layers[1].mlp(x, ctx, 1) - want).abs().max().item() <= 1e-5
    tokens = prompt(16, seed=2)
    with torch.no_grad():
        dense_logits = ref(torch.tensor([tokens])).logits[0, -1]
    ctx = ForwardContext(
        StepBatch.build([tokens], [0], [0]),
        KVCache.for_model(lm.args, 1, 16, torch.float32),
        lm.experts,
        Rotary(lm.args.attention.rope),
        torch.float32,
        row_top_k=[7],
    )
    assert (lm.model(ctx)[0] - dense_logits).abs().max().item() <= 1e-4
    assert (
        ConvertConfig(8, 3, 1, dense_layers=1).active_share(n_layers) == (1 + (n_layers - 1) * 0.5) / n_layers
    )


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--experts", "7", "--top-k", "2"], "does not divide the FFN width 96"),
        (["--experts", "8", "--top-k", "9"], "--top-k must be in 1..8"),
        (["--experts", "8", "--top-k", "8", "--shared-experts", "1"], "--top-k must be in 1..7"),
        (["--experts", "8", "--top-k", "2", "--shared-experts", "8"], "--shared-experts"),
        (["--experts", "8", "--top-k", "2", "--dtype", "int8"], "--dtype must be one of float32"),
        (["--experts", "8", "--top-k", "2", "--dense-layers", "2"], "--dense-layers must be in 0..1"),
    ],
)
def test_bad_conversion_settings(checkpoint, tmp_path, flags, needle):
    folder, _ = checkpoint("llama")
    r = cli("convert", "dense-to-moe", str(folder), str(tmp_path / "out"), *flags)
    assert_clean_error(r, needle)
    assert not (tmp_path / "out").exists()


def test_moe_source_is_refused(checkpoint, tmp_path):
    folder, _ = checkpoint("mixtral")
    r = cli("convert", "dense-to-moe", str(folder), str(tmp_path / "out"), "--experts", "4", "--top-k", "2")
    assert_clean_error(r, "model_type 'mixtral'")
