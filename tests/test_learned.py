"""The learned look-ahead: its fit, its place in the trace file, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.eval.trace import record, save
from moeflow.eval.windows import run_windows, split
from moeflow.llm import LLM
from moeflow.loader.load import load
from moeflow.sim.trace import load_trace, save_trace
from moeflow.store.learned import LookaheadFit


def test_fit_recovers_a_linear_relation():
    """When layer i+1's router input is a linear function of layer i's, the fitted map is the
    composition (router i+1 after that function), up to the small ridge."""
    g = torch.Generator().manual_seed(0)
    E, H, n = 6, 10, 2000
    routers = [torch.randn(E, H, generator=g) for _ in range(3)]
    mix = [torch.randn(H, H, generator=g) / H**0.5 for _ in range(2)]
    fit = LookaheadFit(routers)
    for _ in range(4):
        x0 = torch.randn(n, H, generator=g)
        x1 = x0 @ mix[0]
        fit.add([x0, x1, x1 @ mix[1]])
    maps = fit.solve()
    assert maps.shape == (2, E, H + 1)
    for i in range(2):
        want = (mix[i] @ routers[i + 1].T).T.numpy()
        scale = np.abs(want).max()  # (the ridge shrinks the input's thin directions a little)
        assert np.abs(maps[i, :, :H] - want).max() < 0.03 * scale and np.abs(maps[i, :, H]).max() < 1e-3


def test_trace_carries_maps_that_beat_the_plain_router(chat_model, tmp_path):
    """On the text it was fitted on, the map predicts the next router's logits better than that
    router applied to the stale input (least squares can only do better, up to the ridge); the
    trace file keeps the maps through save, load and head."""
    lm = load(chat_model, progress=False)
    ids = list(range(3, 600))
    arrays = record(lm, ids, window=128, progress=False)
    maps = arrays["lookahead"]
    L = len(lm.args.moe_layers)
    assert maps.shape == (L - 1, lm.args.moe.n_experts, lm.args.hidden + 1)
    path = tmp_path / "t.npz"
    save(path, arrays)
    tr = load_trace(path)
    assert np.array_equal(tr.lookahead, maps) and np.array_equal(tr.head(10).lookahead, maps)
    save_trace(tmp_path / "again.npz", tr)
    assert np.array_equal(load_trace(tmp_path / "again.npz").lookahead, maps)
    xs = {}
    for out in run_windows(lm, split(ids, 128), progress=False, inputs=True):
        for layer, x in out.inputs.items():
            xs.setdefault(layer, []).append(x)
    x = [torch.cat(xs[layer]) for layer in lm.args.moe_layers]
    routers = [lm.model.model.layers[i].mlp.gate.weight.float() for i in lm.args.moe_layers]
    for i in range(L - 1):
        truth = x[i + 1] @ routers[i + 1].T
        fitted = x[i] @ torch.from_numpy(maps[i, :, :-1]).T + torch.from_numpy(maps[i, :, -1])
        stale = x[i] @ routers[i + 1].T
        assert ((fitted - truth) ** 2).mean() < ((stale - truth) ** 2).mean()


def test_auto_prefetch_is_learned_given_a_fitted_trace_else_none(chat_model, tmp_path):
    """The default predictor: learned where --expert-trace carries its fitted maps, none without
    a trace or with one recorded without them (pinned and cooccurrence still use it)."""
    lm = load(chat_model, progress=False)
    fitted, plain = tmp_path / "fitted.npz", tmp_path / "plain.npz"
    save(fitted, record(lm, list(range(3, 300)), window=128, progress=False))
    save(plain, record(lm, list(range(3, 300)), window=128, progress=False, fit_lookahead=False))

    def predictor(**kw):
        return LLM(chat_model, progress=False, expert_memory="25%", **kw).loaded.experts.predictor

    assert predictor(expert_trace=fitted).name == "learned"
    assert predictor(prefetch="auto", expert_trace=plain) is None
    assert predictor() is None
    assert predictor(prefetch="none", expert_trace=fitted) is None


def test_learned_prefetch_needs_a_fitted_trace(chat_model, tmp_path):
    with pytest.raises(ConfigError, match="give --expert-trace"):
        LLM(chat_model, progress=False, expert_memory="25%", prefetch="learned")
    lm = load(chat_model, progress=False)
    old = tmp_path / "old.npz"
    save(old, record(lm, list(range(3, 300)), window=128, progress=False, fit_lookahead=False))
    with pytest.raises(ConfigError, match="holds no learned look-ahead"):
        LLM(chat_model, progress=False, expert_memory="25%", prefetch="learned", expert_trace=old)
    arrays = record(lm, list(range(3, 300)), window=128, progress=False)
    arrays["lookahead"] = arrays["lookahead"][:, :, :-2]
    bad = tmp_path / "bad.npz"
    save(bad, arrays)
    with pytest.raises(ConfigError, match="lookahead maps are"):
        LLM(chat_model, progress=False, expert_memory="25%", prefetch="learned", expert_trace=bad)
