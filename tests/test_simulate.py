"""Trace reading, predictors, the timing model, simulate() and the `simulate` command."""

import argparse
import json

import numpy as np
import pytest

from moeflow.cache import CacheCapacity
from moeflow.cache.predictors import CoOccurrence, RecentFrequency, score_predictions
from moeflow.commands import simulate as command
from moeflow.errors import ConfigError
from moeflow.sim import SimConfig, load_trace, save_trace, simulate
from moeflow.sim.synthetic import SyntheticSpec, synthetic_trace
from moeflow.sim.timing import IoModel, replay_time

SPEC = SyntheticSpec(n_tokens=400, n_layers=4, n_experts=16, top_k=2, seq_len=100)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(SPEC)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory, trace):
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    save_trace(path, trace)
    return path


def test_trace_round_trip(trace, trace_file):
    back = load_trace(trace_file)
    assert (back.experts == trace.experts).all() and back.meta == trace.meta
    assert back.width == 2 and back.n_layers == 4


def bad_trace(tmp_path, **change):
    t = synthetic_trace(SyntheticSpec(n_tokens=8, n_layers=2, n_experts=4, top_k=2))
    arrays = {"experts": t.experts, "weights": t.weights, "tokens": t.tokens, "seq": t.seq}
    meta = {**t.meta.__dict__, **change.pop("meta", {})}
    arrays.update(meta=np.array(json.dumps(meta)), **change)
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_bad_traces(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_trace(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="cannot read trace"):
        load_trace(tmp_path / "junk.npz")
    with pytest.raises(ConfigError, match="moeflow-trace-v0"):
        load_trace(bad_trace(tmp_path, meta={"format": "moeflow-trace-v0"}))
    with pytest.raises(ConfigError, match="no seq array"):
        load_trace(bad_trace(tmp_path, seq=None))
    with pytest.raises(ConfigError, match="outside -1..3"):
        load_trace(bad_trace(tmp_path, experts=np.full((8, 2, 2), 7, np.int16)))
    with pytest.raises(ConfigError, match="twice"):
        load_trace(bad_trace(tmp_path, experts=np.zeros((8, 2, 2), np.int16)))
    with pytest.raises(ConfigError, match="meta lists 3"):
        load_trace(bad_trace(tmp_path, meta={"moe_layers": [0, 1, 2]}))


# 4 tokens, 2 layers, top-2; -1 marks an unused slot
HAND = np.array(
    [[[0, 1], [2, 3]], [[0, 2], [2, -1]], [[0, 1], [3, 2]], [[1, 3], [2, 0]]],
    dtype=np.int16,
)


def test_precision_and_recall_by_hand():
    guess = np.array([[[0, 1], [2, 0]], [[1, 3], [2, 3]], [[0, 1], [1, 3]], [[0, 2], [2, 0]]], np.int16)
    # correct per step (layer 0, layer 1): 2,1 | 0,1 | 2,1 | 0,2 = 9; predicted 16; used 15
    s = score_predictions(guess, HAND)
    assert (s.correct, s.predicted, s.used) == (9, 16, 15)
    assert s.precision == pytest.approx(9 / 16) and s.recall == pytest.approx(9 / 15)


def test_frequency_predictor_by_hand():
    guess = RecentFrequency(2, 4, window=2).predict_trace(HAND, n=1, depth=1)
    # layer 0: t1 sees t0 {0,1} -> 0 (tie, lower id); t2 sees {0,1},{0,2} -> 0; t3 sees {0,2},{0,1} -> 0
    assert guess[1:, 0, 0].tolist() == [0, 0, 0]
    # layer 1: t1 sees {2,3} -> 2; t2 sees {2,3},{2} -> 2; t3 sees {2},{3,2} -> 2
    assert guess[1:, 1, 0].tolist() == [2, 2, 2]


def test_cooccurrence_learns_the_next_layer():
    # layer 0 expert e is always followed by layer 1 expert e + 2
    rng = np.random.default_rng(0)
    first = rng.integers(0, 2, size=200)
    experts = np.stack([first, first + 2], axis=1)[:, :, None].astype(np.int16)  # [T, 2, 1]
    model = CoOccurrence.fit(experts[:100], n_experts=4)
    guess = model.predict_trace(experts, n=1, depth=1)
    assert (guess[100:, 1, 0] == experts[100:, 1, 0]).all()
    assert score_predictions(guess[100:, 1:], experts[100:, 1:]).recall == 1.0


def test_online_predictors_match_offline(trace):
    X, L = trace.experts, trace.n_layers
    for depth in (1, 3):
        online = [RecentFrequency(L, 16, window=8), CoOccurrence.fit(X[:200], 16)]
        offline = [p.predict_trace(X, 3, depth) for p in online]
        for s in range(-depth, X.shape[0] * L - depth):
            if s >= 0:
                t, layer = divmod(s, L)
                for p in online:
                    p.observe(layer, X[t, layer], t)
            t, layer = divmod(s + depth, L)
            for p, want in zip(online, offline):
                assert (p.predict(layer, t, 3) == want[t, layer]).all()


def test_timing_by_hand():
    io = IoModel(bandwidth_gbs=1.0, expert_bytes=1_000_000, compute_ms=1.0)  # a load takes 1 ms
    # step 0 misses one expert (1 ms stall) and issues 2 prefetches for step 1, which arrive at 3 ms;
    # step 0 computes 1..2, step 1 waits for them until 3 and computes to 4, step 2 to 5
    t = replay_time(np.array([1, 0, 0]), np.array([0, 2, 0]), np.array([False, True, False]), 1, io, tokens=1)
    assert (t.total_ms, t.compute_ms, t.stall_ms) == pytest.approx((5.0, 3.0, 2.0))
    plain = replay_time(np.array([1, 0, 2]), np.zeros(3, int), np.zeros(3, bool), 1, io, tokens=1)
    assert (plain.total_ms, plain.stall_ms) == pytest.approx((6.0, 3.0))


def test_staged_timing_by_hand():
    # a layer-step: 2 ms before routing, then 4 experts of 1 ms each; a load takes 1.5 ms
    io = IoModel(bandwidth_gbs=1.0, expert_bytes=1_500_000, compute_ms=6.0, expert_share=4 / 6)
    used = np.array([4, 4])
    # step 0: routed at 2; 3 resident compute 2..5 while its miss lands at 3.5, computes 5..6.
    # Its 2 prefetches for step 1, issued at routing behind the miss, land at 5 and 6.5.
    # step 1: routed at 8, both landed; 4 experts 8..12. Hidden entirely: no stall.
    t = replay_time(np.array([1, 0]), np.array([0, 2]), np.array([0, 2]), 1, io, tokens=1, used=used)
    assert (t.total_ms, t.compute_ms, t.stall_ms) == pytest.approx((12.0, 12.0, 0.0))
    # 3 misses: land at 3.5, 5, 6.5; the resident expert computes 2..3, then 3.5..4.5, 5..6, 6.5..7.5
    t = replay_time(np.array([3]), np.zeros(1, int), np.zeros(1, int), 1, io, tokens=1, used=np.array([4]))
    assert (t.total_ms, t.stall_ms) == pytest.approx((7.5, 1.5))
    # the serial model charges the same three loads in full: 4.5 ms stalled
    serial = IoModel(bandwidth_gbs=1.0, expert_bytes=1_500_000, compute_ms=6.0)
    t = replay_time(np.array([3]), np.zeros(1, int), np.zeros(1, int), 1, serial, tokens=1)
    assert t.stall_ms == pytest.approx(4.5)
    with pytest.raises(ConfigError, match="expert share"):
        IoModel(bandwidth_gbs=1.0, expert_bytes=1, compute_ms=1.0, expert_share=1.0)


def test_staged_timing_hides_loads_that_serial_charges(trace):
    cfg = dict(capacity=CacheCapacity(per_layer=4), policy="lru", bandwidth_gbs=1.0, compute_ms=2.0)
    serial = simulate(trace, SimConfig(**cfg))
    staged = simulate(trace, SimConfig(**cfg, expert_share=0.8))
    assert staged.stats == serial.stats and staged.timing.compute_ms == serial.timing.compute_ms
    assert 0 < staged.timing.stall_ms < serial.timing.stall_ms
    ahead = simulate(trace, SimConfig(**cfg, expert_share=0.8, predictor="oracle"))
    assert 0 <= ahead.timing.stall_ms < staged.timing.stall_ms  # prefetched reads hide further
    with pytest.raises(ConfigError, match="expert share"):
        SimConfig(**cfg, expert_share=-0.1)


def test_simulate_oracle_prefetch_hits_everything(trace):
    r = simulate(trace, SimConfig(CacheCapacity(per_layer=4), "lru", predictor="oracle"))
    assert r.hit_rate == 1.0 and r.stats.misses == 0 and r.stats.prefetch_hits == r.stats.prefetches
    assert r.prediction.precision == 1.0 and r.first_token == 200 and r.tokens == 200
    assert r.bytes_moved == r.stats.prefetches * trace.meta.expert_bytes
    json.dumps(r.to_dict())  # JSON-serialisable as is


@pytest.mark.parametrize("capacity", [CacheCapacity(per_layer=3), CacheCapacity(total=10)])
def test_simulate_policies_under_belady(trace, capacity):
    rates = {
        p: simulate(trace, SimConfig(capacity, p, predictor="frequency")).hit_rate
        for p in ("lru", "lfu", "pinned", "reuse")
    }
    bound = simulate(trace, SimConfig(capacity, "belady")).hit_rate
    assert 0 < max(rates.values()) and all(0 <= r <= 1 for r in rates.values())
    plain = {p: simulate(trace, SimConfig(capacity, p)).hit_rate for p in rates}
    assert all(bound >= r for r in plain.values()), (bound, plain)


def test_simulate_rejects_bad_configs(trace):
    with pytest.raises(ConfigError, match="smaller than the 2 experts"):
        simulate(trace, SimConfig(CacheCapacity(per_layer=1), "lru"))
    with pytest.raises(ConfigError, match="at least 4"):
        simulate(trace, SimConfig(CacheCapacity(total=3), "lru", predictor="frequency"))
    with pytest.raises(ConfigError, match="unknown predictor"):
        simulate(trace, SimConfig(CacheCapacity(per_layer=2), "lru", predictor="psychic"))
    with pytest.raises(ConfigError, match="fit fraction"):
        SimConfig(CacheCapacity(per_layer=2), fit_fraction=1.0)


def cli(*argv: str) -> int:
    ap = argparse.ArgumentParser(prog="moeflow")
    command.add_parser(ap.add_subparsers(dest="command", required=True))
    return command.run(ap.parse_args(["simulate", *argv]))


def test_command_table(trace_file, capsys):
    assert (
        cli("--trace", str(trace_file), "--capacity", "4", "--policy", "all", "--predictor", "cooccurrence")
        == 0
    )
    out = capsys.readouterr().out
    for name in ("lru+cooccurrence", "belady+cooccurrence", "hit rate", "ms/token", "recall"):
        assert name in out
    assert "400 tokens x 4 MoE layers" in out


def test_command_sweep_json_and_plot(trace_file, tmp_path, capsys):
    png, js = tmp_path / "sweep.png", tmp_path / "sweep.json"
    assert (
        cli(
            "--trace",
            str(trace_file),
            "--sweep",
            "--policy",
            "lru,belady",
            "--plot",
            str(png),
            "--json",
            str(js),
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "hit rate / capacity (per layer)" in out and "belady" in out
    doc = json.loads(js.read_text())
    assert doc["trace"]["tokens"] == 400
    assert sorted({r["capacity"] for r in doc["results"]}) == [2, 3, 4, 6, 8, 11, 16]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_global_list(trace_file, capsys):
    assert cli("--trace", str(trace_file), "--capacity", "8,16", "--capacity-scope", "global") == 0
    assert "hit rate / capacity (in all)" in capsys.readouterr().out


def test_command_staged_timing_is_faster(trace_file, tmp_path):
    stalls = []
    for share in ("0", "0.7"):
        js = tmp_path / f"{share}.json"
        argv = ["--trace", str(trace_file), "--capacity", "4", "--expert-share", share, "--json", str(js)]
        assert cli(*argv) == 0
        stalls.append(json.loads(js.read_text())["results"][0]["timing"]["stall_ms"])
    assert 0 < stalls[1] < stalls[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--capacity", "4", "--policy", "fifo"], "unknown policy fifo"),
        (["--capacity", "1"], "smaller than the 2 experts"),
        (["--capacity", "four"], "--capacity wants N"),
        ([], "give --capacity"),
        (["--capacity", "4", "--predictor", "magic"], "unknown predictor magic"),
        (["--capacity", "4", "--expert-share", "1.5"], "expert share of compute must be in"),
    ],
)
def test_command_errors(trace_file, argv, message):
    with pytest.raises(ConfigError, match=message):
        cli("--trace", str(trace_file), *argv)


def test_command_missing_trace(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cli("--trace", str(tmp_path / "nope.npz"), "--capacity", "4")
