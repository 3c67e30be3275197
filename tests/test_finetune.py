"""End-to-end distillation of a converted model (convert dense-to-moe --finetune-tokens)."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_convert import calibration, dense  # noqa: F401 (fixture)

from moeflow.convert.dense_to_moe import convert
from moeflow.convert.finetune import VALIDATION_WINDOWS, FinetuneConfig, _windows
from moeflow.convert.moefy import ConvertConfig
from moeflow.convert.train_forward import LlamaForward
from moeflow.errors import ConfigError
from moeflow.loader.load import load

from test_cli_errors import assert_clean_error, cli
from test_parity import our_logits, prompt

WINDOW = 32


def test_training_forward_matches_transformers(dense):  # noqa: F811
    """The batched training forward is the reference's dense model, row by row."""
    model, ref = dense
    ids = torch.tensor([prompt(WINDOW, seed=1), prompt(WINDOW, seed=2)])
    with torch.no_grad():
        want = ref(ids).logits
        fwd = LlamaForward(model)
        got = fwd.logits(ids, fwd.dense_ffn)
    assert (got - want).abs().max().item() <= 1e-4


def text() -> list[int]:
    """Eight windows repeated: the held-out windows were also trained on. A random tiny model on
    random tokens has nothing to generalise, so this checks that training lowers the objective and
    that the written checkpoint is what was trained; held-out quality is bench_convert's job."""
    return calibration(8 * WINDOW) * 8


def tuned(model, out, router: bool = True, attention: bool = False, dense_layers: int = 0):
    tune = FinetuneConfig(
        tokens=40 * 4 * WINDOW,
        lr=1e-2,
        window=WINDOW,
        batch=4,
        train_router=router,
        train_attention=attention,
        eval_every=10,
    )
    cfg = ConvertConfig(
        experts=8, top_k=2, shared=1, calibration_tokens=1024, finetune=tune, dense_layers=dense_layers
    )
    return convert(model, out, cfg, text(), progress=False)


def kl_of_checkpoint(model, folder, ids: torch.Tensor) -> float:
    """Mean per-token KL(dense || checkpoint) over windows, computed by the inference engine."""
    fwd = LlamaForward(model)
    with torch.no_grad():
        teacher = torch.log_softmax(fwd.logits(ids, fwd.dense_ffn), -1).flatten(0, 1)
    lm = load(folder, progress=False)
    logp = torch.log_softmax(torch.cat([our_logits(lm, row.tolist(), WINDOW) for row in ids]), -1)
    return F.kl_div(logp, teacher, log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("attention, dense_layers", [(False, 0), (True, 0), (False, 1)])
def test_finetune_lowers_held_out_kl_and_the_checkpoint_computes_what_was_trained(
    dense,  # noqa: F811
    tmp_path,
    attention,
    dense_layers,
):
    """With attention trained too, the written checkpoint carries the trained projections (the
    engine's KL equals the trainer's) and the dense model the teacher used is left unchanged;
    a first layer kept dense is the dense model's FFN in both, untrained."""
    model, _ = dense
    before = {k: v.clone() for k, v in model.tensors.items() if "self_attn" in k}
    s = tuned(model, tmp_path / "moe", attention=attention, dense_layers=dense_layers)
    assert all(torch.equal(model.tensors[k], v) for k, v in before.items())
    assert s.finetune is not None and s.finetune.steps == 40
    assert s.finetune.kl_after < 0.6 * s.finetune.kl_before
    curve = s.finetune.curve  # held-out KL every 10 steps, from before the first to after the last
    assert [t for t, _ in curve] == [0, 1280, 2560, 3840, 5120]
    assert curve[0][1] == s.finetune.kl_before and curve[-1][1] == s.finetune.kl_after
    # the engine, loading the written checkpoint, sees the KL the trainer reported on its held-out windows
    val = _windows(text(), WINDOW)[-VALIDATION_WINDOWS:]
    assert abs(kl_of_checkpoint(model, tmp_path / "moe", val) - s.finetune.kl_after) <= 1e-4
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["moeflow_conversion"]["finetune"]["tokens"] == 40 * 4 * WINDOW
    assert cfg["moeflow_conversion"]["finetune"]["train_attention"] == attention
    from safetensors.torch import load_file

    saved = {}
    for f in (tmp_path / "moe").glob("*.safetensors"):
        saved |= load_file(f)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved[q].float(), model.tensors[q].float()) != attention


def test_router_trains_unless_frozen(dense, tmp_path):  # noqa: F811
    """The straight-through gradient reaches the routers; --finetune-frozen-router trains only the
    experts and writes the layer-wise routers unchanged."""
    from safetensors.torch import load_file

    model, _ = dense
    tuned(model, tmp_path / "frozen", router=False)
    tuned(model, tmp_path / "trained", router=True)
    plain = ConvertConfig(experts=8, top_k=2, shared=1, calibration_tokens=1024)
    convert(model, tmp_path / "plain", plain, text(), progress=False)
    w = {d: load_file(str(tmp_path / d / "model.safetensors")) for d in ("frozen", "trained", "plain")}
    router = "model.layers.1.mlp.gate.weight"
    expert = "model.layers.1.mlp.experts.0.up_proj.weight"
    assert torch.equal(w["frozen"][router], w["plain"][router])
    assert not torch.equal(w["trained"][router], w["plain"][router])
    assert not torch.equal(w["frozen"][expert], w["plain"][expert])


def test_bad_finetune_settings(checkpoint, dense, tmp_path):  # noqa: F811
    folder, _ = checkpoint("llama")
    base = [str(folder), str(tmp_path / "out"), "--experts", "8", "--top-k", "2"]
    assert_clean_error(
        cli("convert", "dense-to-moe", *base, "--finetune-lr", "2"), "--finetune-lr must be in (0, 1)"
    )
    assert_clean_error(
        cli("convert", "dense-to-moe", *base, "--finetune-tokens", "-1"), "--finetune-tokens must be"
    )
    model, _ = dense
    cfg = ConvertConfig(experts=8, top_k=2, calibration_tokens=1024, finetune=FinetuneConfig(tokens=1000))
    with pytest.raises(ConfigError, match=r"fine-tuning needs ≥ 3072 calibration tokens, got 2048"):
        convert(model, tmp_path / "out", cfg, calibration(2048), progress=False)
    assert not (tmp_path / "out").exists()
