"""The tiered expert store must never change what the model computes: for every budget, policy,
scope and predictor, greedy tokens equal the all-resident run's and logits differ by <= 1e-6.
The cache never holds more than its budget, and bad budgets or files give one clear line."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeflow.engine.sampling import SamplingParams
from moeflow.errors import CheckpointError, ConfigError
from moeflow.eval.trace import record, save
from moeflow.eval.windows import run_windows, split
from moeflow.kernels import ExpertPtrs
from moeflow.llm import LLM
from moeflow.loader.load import load
from moeflow.store import aio, build
from moeflow.store.aio_direct import AioDirectExperts
from moeflow.store.aio_experts import AioExperts
from moeflow.store.aio_native import NativeAioExperts
from moeflow.store.cached import CachedExperts
from moeflow.store.config import StoreConfig
from moeflow.store.tiered import TieredExperts

PROMPTS = [[5, 17, 230, 9, 44, 1000, 3], [77, 12, 5, 600, 601, 2, 8, 9, 31, 40, 41]]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
WINDOWS = [list(range(40, 88)), list(range(300, 340)), list(range(1000, 1030))]


def _aio_here() -> bool:
    """Linux AIO works and the test files' file system takes O_DIRECT (tmpfs does not)."""
    import tempfile

    if not aio.available() or not hasattr(os, "O_DIRECT"):
        return False
    with tempfile.NamedTemporaryFile() as f:
        try:
            os.close(os.open(f.name, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            return False
    return True


# the store's read paths: reader threads, and Linux AIO either straight into the slots (where the
# checkpoint's layout allows, as the test models' does; each layer's step in one native call with
# the cyclic policy, in Python otherwise) or through bounce buffers; the single-expert matrix
# below runs the default ("auto": aio into the slots here, native with cyclic)
_NO_AIO = pytest.mark.skipif(not _aio_here(), reason="no AIO/O_DIRECT")
IO_PATHS = {
    "threads": TieredExperts,
    "aio": NativeAioExperts,
    "aio-python": AioDirectExperts,
    "aio-bounce": AioExperts,
}
AIO_PATHS = [pytest.param(p, marks=_NO_AIO) for p in ("aio", "aio-python", "aio-bounce")]


def _choose_path(name: str, monkeypatch) -> None:
    """ "aio-python": the in-slot store with its Python step; "aio-bounce": the in-slot layout
    turned down."""
    if name == "aio-python":
        monkeypatch.setattr(build, "native_step_usable", lambda spec: False)
    if name == "aio-bounce":
        monkeypatch.setattr(build, "direct_layout", lambda *a: None)


@pytest.fixture(params=["threads", *AIO_PATHS])
def io(request, monkeypatch):
    """The read path's name, as given to expert_io."""
    _choose_path(request.param, monkeypatch)
    return "threads" if request.param == "threads" else "aio"


@pytest.fixture(scope="module")
def top1_model(chat_model, tmp_path_factory):
    """The tiny chat model routed top-1, so a budget of one expert per layer is legal."""
    path = tmp_path_factory.mktemp("top1") / "model"
    shutil.copytree(chat_model, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def traces(chat_model, top1_model, tmp_path_factory):
    """A recorded routing trace per model: pinned's hot set, cooccurrence's training data and the
    learned look-ahead's maps."""
    out = {}
    for name, path in (("top4", chat_model), ("top1", top1_model)):
        lm = load(path, progress=False)
        trace = tmp_path_factory.mktemp("trace") / f"{name}.npz"
        save(trace, record(lm, list(range(3, 600)), window=128, progress=False))
        out[name] = str(trace)
    return out


def expert_bytes(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    return 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 4


def run(path: Path, **store) -> tuple[list[list[int]], torch.Tensor, LLM]:
    llm = LLM(path, progress=False, **store)
    tiered = llm.loaded.experts
    if isinstance(tiered, CachedExperts):
        check_budget(tiered)
    tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    logits = torch.cat([w.logits for w in run_windows(llm.loaded, WINDOWS, batch=2, progress=False)])
    return tokens, logits, llm


def check_budget(store: CachedExperts) -> None:
    """Wraps fetch and prefetch to assert the cache holds no more than its capacity at any time."""
    cap = store.cache.capacity
    limit = cap.total if cap.per_layer is None else cap.per_layer * len(store.layers)
    slots = store.slots.data_ptr()

    def checked(fn):
        def call(*a, **k):
            out = fn(*a, **k)
            assert len(store.cache) <= limit, f"cache holds {len(store.cache)} > {limit}"
            if cap.per_layer is not None:
                assert store.cache.count.max() <= cap.per_layer
            assert store.slots.data_ptr() == slots  # no buffer beyond the preallocated budget
            assert (store.slot_of >= 0).sum() == len(store.cache)
            return out

        return call

    store.fetch, store.prefetch = checked(store.fetch), checked(store.prefetch)
    if store.fetch_staged is not None:
        store.fetch_staged = checked(store.fetch_staged)


@pytest.fixture(scope="module")
def reference(chat_model, top1_model):
    return {"top4": run(chat_model)[:2], "top1": run(top1_model)[:2]}


def assert_same(got, want):
    assert got[0] == want[0], "generated tokens differ from the all-resident run"
    assert (got[1] - want[1]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("prefetch", ["none", "lookahead", "learned", "frequency", "cooccurrence"])
@pytest.mark.parametrize("policy", ["cyclic", "lru", "lfu", "reuse", "pinned"])
def test_single_expert_budget_is_exact(top1_model, reference, traces, policy, prefetch, scope):
    """Top-1 routing, a budget of one expert per layer (or one in all): every step evicts."""
    n = 4 if scope == "layer" else 1  # 4 MoE layers
    tokens, logits, llm = run(
        top1_model,
        expert_memory=n * expert_bytes(top1_model),
        expert_policy=policy,
        expert_scope=scope,
        prefetch=prefetch,
        expert_trace=traces["top1"],
    )
    assert_same((tokens, logits), reference["top1"])
    stats = llm.expert_stats()
    assert stats["misses"] > 0 and stats["bytes_read"] >= stats["misses"] * expert_bytes(top1_model)
    assert stats["budget_bytes"] == n * expert_bytes(top1_model)


@pytest.mark.parametrize("share", ["4", "25%", "50%", "90%"])
@pytest.mark.parametrize("prefetch", ["lookahead", "learned", "cooccurrence"])
def test_budgets_are_exact(chat_model, reference, traces, share, prefetch, io, request):
    """Top-4 of 16 experts; "4" = exactly one layer's top-k in all, the least that works."""
    budget = 4 * expert_bytes(chat_model) if share == "4" else share
    tokens, logits, llm = run(
        chat_model, expert_memory=budget, prefetch=prefetch, expert_trace=traces["top4"], expert_io=io
    )
    assert type(llm.loaded.experts) is IO_PATHS[request.node.callspec.params["io"]]
    assert_same((tokens, logits), reference["top4"])
    s = llm.expert_stats()
    assert s["precision"] is not None and 0 < s["recall"] <= 1
    assert s["hits"] + s["misses"] > 0


def test_fused_layout_is_exact(checkpoint):
    """Experts stored as fused [E, 2I, H] / [E, H, I] tensors are read in place as well."""
    path, _ = checkpoint("qwen3_moe", fused=True)
    wins = split(list(range(2, 150)), 37)
    want = torch.cat([w.logits for w in run_windows(load(path, progress=False), wins, progress=False)])
    lm = load(path, progress=False, store=StoreConfig(expert_memory="40%", policy="lfu"))
    assert isinstance(lm.experts, CachedExperts)
    got = torch.cat([w.logits for w in run_windows(lm, wins, progress=False)])
    assert (got - want).abs().max().item() <= 1e-6


def test_one_reader_at_a_time_is_exact(chat_model, reference):
    """The sequential baseline (one read at a time, in order: what offloading papers call naive)."""
    got = run(chat_model, expert_memory="25%", prefetch="none", expert_io="threads", expert_io_threads=1)
    assert got[2].loaded.experts.demand is None  # no pool: each miss read before the next
    assert_same(got[:2], reference["top4"])


def test_stats_count_reads(chat_model, io):
    llm = LLM(chat_model, progress=False, expert_memory="25%", prefetch="none", expert_io=io)
    llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY)
    s = llm.expert_stats()
    assert s["prefetches"] == 0 and s["precision"] is None
    assert s["bytes_read"] == s["misses"] * expert_bytes(chat_model)
    assert 0 < s["stall_s"] <= s["store_s"]  # the store's time on the model's thread holds its waits
    assert LLM(chat_model, progress=False).expert_stats() is None


@pytest.mark.parametrize("prefetch", ["none", "lookahead"])
def test_truncated_file_mid_run_is_an_error_and_leaves_no_bad_expert(
    chat_model, reference, tmp_path, prefetch, io, request
):
    """A read that comes up short raises; the experts it was filling leave the cache, so once the
    file is whole again the output is exactly right (no slot computes with partial bytes)."""
    path = tmp_path / "model"
    shutil.copytree(chat_model, path)
    llm = LLM(path, progress=False, expert_memory="25%", prefetch=prefetch, expert_io=io)
    assert type(llm.loaded.experts) is IO_PATHS[request.node.callspec.params["io"]]
    llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY)
    (weights,) = path.glob("*.safetensors")
    whole = weights.read_bytes()
    os.truncate(weights, len(whole) // 2)
    with pytest.raises(CheckpointError, match="ended early"):
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    with open(weights, "r+b") as f:  # the same inode the store reads through
        f.write(whole)
    tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    assert tokens == reference["top4"][0]


def test_deleted_file_mid_run_keeps_serving(chat_model, reference, tmp_path, io, request):
    """The open descriptor holds the inode: the original bytes are still read, exactly."""
    path = tmp_path / "model"
    shutil.copytree(chat_model, path)
    llm = LLM(path, progress=False, expert_memory="25%", expert_io=io)
    assert type(llm.loaded.experts) is IO_PATHS[request.node.callspec.params["io"]]
    for f in path.glob("*.safetensors"):
        f.unlink()
    tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    assert tokens == reference["top4"][0]


@pytest.fixture(params=AIO_PATHS)
def aio_path(request, monkeypatch):
    """The AIO stores: reads straight into the slots (native or Python step), or through bounce
    buffers."""
    _choose_path(request.param, monkeypatch)
    return IO_PATHS[request.param]


def test_aio_prefetch_cancelled_in_flight_leaves_its_slot_clean(chat_model, aio_path):
    """A prefetched key evicted before its read lands gives up its slot (at once where the kernel
    writes a bounce buffer, once the read lands where it writes the slot): the next key in that
    slot gets exactly its own bytes."""
    resident = LLM(chat_model, progress=False).loaded.experts
    llm = LLM(chat_model, progress=False, expert_memory=8 * expert_bytes(chat_model), expert_io="aio")
    store = llm.loaded.experts
    assert type(store) is aio_path
    layer = store.layers[0]
    for _ in range(3):
        store.prefetch(layer, [0, 1, 2, 3])
        store._invalidate([0, 1, 2, 3])  # evicted while in flight
        got = store.fetch(layer, [4, 5, 6, 7])  # demand-read into the freed slots
        for (g13, g2), (w13, w2) in zip(got, resident.fetch(layer, [4, 5, 6, 7])):
            assert torch.equal(g13, w13) and torch.equal(g2, w2)
        store._invalidate([4, 5, 6, 7])
    store.close()
    assert store.reads_in_flight == 0


@pytest.mark.parametrize("depth", [64, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_aio_reads_in_chunks_are_exact(chat_model, monkeypatch, aio_path, dtype, depth):
    """Experts larger than one read (here reads of 8 KiB, so chunk edges fall inside tensors and
    across them), in the disk's dtype or converted into the slots' (bf16 slots over fp32 files,
    always through bounce buffers); with 4 reads in flight, a demand batch of more experts goes
    to the reader threads (bounce buffers) or in waves (into the slots)."""
    from moeflow.store import aio_direct, aio_experts

    monkeypatch.setattr(aio_experts, "CHUNK", 8192)
    monkeypatch.setattr(aio_experts, "BOUNCE_BYTES", depth * 8192)
    monkeypatch.setattr(aio_direct, "DEPTH", depth)
    want = LLM(chat_model, progress=False, dtype=dtype)
    llm = LLM(chat_model, progress=False, dtype=dtype, expert_memory="25%", prefetch="lookahead")
    store = llm.loaded.experts
    assert type(store) is (aio_path if dtype == "float32" else AioExperts)
    assert store.queue_depth == depth and getattr(store, "_size", 8192) == 8192
    got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    assert got == [o.token_ids for o in want.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    if dtype == "float32":  # (run_windows computes in float32)
        a, b = (
            torch.cat([w.logits for w in run_windows(m.loaded, WINDOWS, progress=False)]) for m in (llm, want)
        )
        assert torch.equal(a, b)
    s = llm.expert_stats()
    layer = store.layers[0]  # every expert of a layer, read in chunks, as resident
    for e in range(0, 16, 4):
        ids = list(range(e, e + 4))
        for (g13, g2), (w13, w2) in zip(store.fetch(layer, ids), want.loaded.experts.fetch(layer, ids)):
            assert torch.equal(g13, w13) and torch.equal(g2, w2)
    one = store.load_nbytes  # (prefetches still in flight are not counted yet)
    assert s["misses"] * one <= s["bytes_read"] <= (s["misses"] + s["prefetches"]) * one


def hold_reads(store) -> Callable[[], None]:
    """From now on a look for completions without waiting finds none (reads seem slow to land);
    returns what undoes it."""
    if isinstance(store, NativeAioExperts):
        store._st.hold = 1
        return lambda: setattr(store._st, "hold", 0)
    reap = store.q.reap
    store.q.reap = lambda least: reap(least) if least else []
    return lambda: setattr(store.q, "reap", reap)


def fail_first_read(store, hold: bool = False) -> None:
    """The store's next read to complete comes back as an I/O error (then reads are normal
    again); hold: until then, a look for completions without waiting finds none."""
    import errno

    if isinstance(store, NativeAioExperts):  # (injected in store.c, as the kernel's result)
        store._st.fail_read, store._st.hold = errno.EIO, int(hold)
        return
    reap = store.q.reap

    def failing(least):
        if hold and not least:
            return []
        done = reap(least)
        if done:
            done[0] = (done[0][0], -errno.EIO)
            store.q.reap = reap
        return done

    store.q.reap = failing


def refuse_next_submit(store) -> Callable[[], None]:
    """The kernel refuses the store's next submission (EIO); returns what undoes it."""
    import errno

    if isinstance(store, NativeAioExperts):
        store._st.fail_submit = errno.EIO
        return lambda: setattr(store._st, "fail_submit", 0)

    def refused(batch):
        raise OSError(errno.EIO, "io_submit: injected")

    submit, store.q.submit = store.q.submit, refused
    return lambda: setattr(store.q, "submit", submit)


def nothing_pending(store) -> bool:
    """No read in flight nor failure recorded for any key."""
    if isinstance(store, NativeAioExperts):
        return not store._pending.any() and not store._failed.any()
    return not store._pending and not store._failed


def test_aio_failures_leave_no_key_without_its_bytes(chat_model, aio_path):
    """A submission the kernel refuses (during a prefetch) or a read that fails on completion
    (during a demand load) raises; the keys involved leave the cache, every bounce buffer comes
    back, and the next request reads those experts afresh, exactly."""
    resident = LLM(chat_model, progress=False).loaded.experts
    llm = LLM(chat_model, progress=False, expert_memory=8 * expert_bytes(chat_model), expert_io="aio")
    store = llm.loaded.experts
    assert type(store) is aio_path
    layer, ids = store.layers[0], [0, 1, 2, 3]
    n_bufs = len(getattr(store, "_free_bufs", ()))
    keys = [store.index[layer] * store.n_experts + e for e in ids]
    undo = refuse_next_submit(store)
    with pytest.raises(OSError, match="io_submit"):
        store.prefetch(layer, ids)
    undo()
    assert not store.cache.resident[keys].any() and (store.slot_of[keys] < 0).all()
    fail_first_read(store)
    with pytest.raises(OSError, match="Input/output error"):
        store.fetch(layer, ids)
    assert not store.cache.resident[keys].any() and (store.slot_of[keys] < 0).all()
    assert len(getattr(store, "_free_bufs", ())) == n_bufs and nothing_pending(store)
    for (g13, g2), (w13, w2) in zip(store.fetch(layer, ids), resident.fetch(layer, ids)):
        assert torch.equal(g13, w13) and torch.equal(g2, w2)


def test_aio_decode_computes_its_experts_in_memory_while_the_rest_land(chat_model, aio_path):
    """Reads made slow to land (a look for completions without waiting finds none): every decode
    step's misses are still in flight when the token starts computing the experts it has, and
    the token waits for the rest only after. Tokens and logits stay the resident run's."""
    llm = LLM(chat_model, progress=False, expert_memory="25%", prefetch="lookahead", expert_io="aio")
    store = llm.loaded.experts
    assert type(store) is aio_path
    check_budget(store)
    undo, staged, late = hold_reads(store), store.fetch_staged, []

    def counted(layer, ids):
        got = staged(layer, ids)
        late.append(0 < len(got[1]) < len(ids))  # some computed early, some late
        return got

    store.fetch_staged = counted
    want = LLM(chat_model, progress=False)
    for prompt in PROMPTS:  # one sequence at a time: a decode step is then a single token
        got = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
        assert got == want.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
    singles = [[t] for t in range(40, 70)]  # one-token windows: the same path, logits compared
    a, b = (
        torch.cat([w.logits for w in run_windows(m.loaded, singles, batch=1, progress=False)])
        for m in (llm, want)
    )
    assert torch.equal(a, b)
    assert sum(late) >= 5, "no decode step split its experts"
    undo()
    store.close()
    assert store.reads_in_flight == 0


def test_aio_prediction_runs_while_a_layer_waits_for_its_reads(chat_model, aio_path):
    """A staged fetch whose reads are still landing leaves the next layer's prediction (and its
    prefetch) to settle(), which runs it before waiting, so the experts in memory are computed
    first; with nothing late it runs at once, inside fetch_staged."""
    llm = LLM(chat_model, progress=False, expert_memory="25%", prefetch="lookahead", expert_io="aio")
    store = llm.loaded.experts
    assert type(store) is aio_path
    events, predict = [], store._predict
    store._predict = lambda li, routed: (events.append(("predict", li)), predict(li, routed))[1]
    wait = "_await" if isinstance(store, NativeAioExperts) else "_arrive"  # (where settle waits)
    arrive = getattr(store, wait)
    setattr(store, wait, lambda *a: (events.append(("arrive",)), arrive(*a))[1])
    undo = hold_reads(store)  # no read seen landed before settle
    layer, ids = store.layers[0], [0, 1, 2, 3]
    x = torch.randn(1, store.hidden)
    store.on_route(layer, x, torch.tensor([ids]))
    _, late, settle = store.fetch_staged(layer, ids)
    assert late == [0, 1, 2, 3] and events == []  # cold: all four in flight, nothing predicted yet
    settle()
    assert events[0] == ("predict", 0) and ("arrive",) in events[1:]
    events.clear()
    store.on_route(layer, x, torch.tensor([ids]))
    weights, late, _ = store.fetch_staged(layer, ids)
    assert late == [] and events == [("predict", 0)]
    resident = LLM(chat_model, progress=False).loaded.experts  # (the native step's are addresses)
    for i, ((g13, g2), (w13, w2)) in enumerate(zip(weights, resident.fetch(layer, ids), strict=True)):
        assert torch.equal(g13, w13) and torch.equal(g2, w2)
        if isinstance(weights, ExpertPtrs):  # what the fused kernel reads is those views' memory
            assert (weights.w13[i], weights.w2[i]) == (g13.data_ptr(), g2.data_ptr())
    undo()
    store.close()
    assert store.reads_in_flight == 0


def test_aio_late_read_failing_raises_at_settle_and_leaves_no_key_without_bytes(chat_model, aio_path):
    """A demand read that fails after the token started computing: settle() raises, this fetch's
    keys leave the cache, and the next fetch reads them again, exactly."""

    resident = LLM(chat_model, progress=False).loaded.experts
    llm = LLM(chat_model, progress=False, expert_memory=8 * expert_bytes(chat_model), expert_io="aio")
    store = llm.loaded.experts
    assert type(store) is aio_path
    layer, ids = store.layers[0], [0, 1, 2, 3]
    keys = [store.index[layer] * store.n_experts + e for e in ids]
    store.fetch(layer, ids[:2])  # two resident, two to read
    fail_first_read(store, hold=True)  # nothing lands before settle
    weights, late, settle = store.fetch_staged(layer, ids)
    assert late == [2, 3]
    with pytest.raises(OSError, match="Input/output error"):
        settle()
    assert not store.cache.resident[keys].any() and (store.slot_of[keys] < 0).all()
    assert nothing_pending(store)
    for (g13, g2), (w13, w2) in zip(store.fetch(layer, ids), resident.fetch(layer, ids)):
        assert torch.equal(g13, w13) and torch.equal(g2, w2)


@_NO_AIO
def test_native_step_refuses_bad_ids_and_stops_after_a_failed_wait(chat_model):
    """An id the cache would skip as unused (-1) is refused, leaving the cache as it was. A wait
    for reads that fails (io_getevents itself, injected in store.c) leaves nothing known to be
    safe, so the store refuses every later request with the same one line."""
    import errno

    llm = LLM(chat_model, progress=False, expert_memory=8 * expert_bytes(chat_model), expert_io="aio")
    store = llm.loaded.experts
    assert type(store) is NativeAioExperts
    layer = store.layers[0]
    with pytest.raises(ValueError, match="expert id -1 out of range"):
        store.fetch(layer, [0, -1])
    assert len(store.cache) == 0 and (store.slot_of < 0).all()
    store._st.hold = 1  # nothing seen landed before settle
    _, late, settle = store.fetch_staged(layer, [0, 1, 2, 3])
    assert late == [0, 1, 2, 3]
    store._st.fail_reap = errno.EINVAL
    with pytest.raises(RuntimeError, match="can no longer read safely .io_getevents: Invalid argument"):
        settle()
    for call in (lambda: store.fetch(layer, [4]), lambda: store.prefetch(layer, [5])):
        with pytest.raises(RuntimeError, match="can no longer read safely"):
            call()
    store.close()
    assert store.reads_in_flight == 0


def test_aio_is_refused_where_it_cannot_run(chat_model, monkeypatch):
    """AIO reads asynchronously only with O_DIRECT: where files are read buffered (here forced by
    keeping the page cache, as on a file system without O_DIRECT), io="aio" is one clear error
    and "auto" falls back to reader threads."""
    from moeflow.store import reader

    monkeypatch.setattr(reader, "KEEP_PAGE_CACHE", True)
    with pytest.raises(ConfigError, match="expert io aio needs"):
        LLM(chat_model, progress=False, expert_memory="25%", expert_io="aio")
    llm = LLM(chat_model, progress=False, expert_memory="25%")
    assert type(llm.loaded.experts) is TieredExperts
    assert llm.expert_stats()["read_mode"] == "buffered (page cache kept)"
    with pytest.raises(ConfigError, match="expert io must be auto, aio or threads"):
        LLM(chat_model, progress=False, expert_memory="25%", expert_io="uring")


def test_bad_budgets(chat_model, capsys):
    with pytest.raises(ConfigError, match="fewer than the 4 one layer runs at once"):
        LLM(chat_model, progress=False, expert_memory=3 * expert_bytes(chat_model))
    with pytest.raises(ConfigError, match="per layer"):
        LLM(chat_model, progress=False, expert_memory="10%", expert_scope="layer")
    with pytest.raises(ConfigError, match="unknown size unit .parsecs."):
        LLM(chat_model, progress=False, expert_memory="12 parsecs")
    with pytest.raises(ConfigError, match="unknown expert cache policy"):
        LLM(chat_model, progress=False, expert_memory="50%", expert_policy="fifo")
    with pytest.raises(ConfigError, match="expert-trace"):
        LLM(chat_model, progress=False, expert_memory="50%", expert_policy="pinned")
    with pytest.raises(ConfigError, match="expert-trace"):
        LLM(chat_model, progress=False, expert_memory="50%", prefetch="cooccurrence")
    llm = LLM(chat_model, progress=False, expert_memory="64GiB")
    assert llm.expert_stats() is None  # more than the model: everything resident
    assert "all stay resident" in capsys.readouterr().err


def test_trace_of_another_model_is_refused(chat_model, traces):
    from moeflow.store.predict import model_trace

    with pytest.raises(ConfigError, match="recorded on 4 MoE layers x 16 experts; this model has 3 x 16"):
        model_trace(traces["top1"], [0, 1, 2], 16)


# ---- the device tier (an accelerator's expert cache over a RAM tier). Without a GPU its
# bookkeeping runs on device="cpu" with synchronous copies: the same slots, cache, prediction and
# compute-where-the-weights-are path, minus the CUDA streams.


def on_device_tier(llm: LLM, budget: int, miss: str, prefetch: str, policy: str = "cyclic") -> list[int]:
    """Puts a device tier over the LLM's own expert store; returns a list that counts, per fetch,
    the experts handed back from the host (computed where they live)."""
    from moeflow.store.build import slot_spec
    from moeflow.store.device import DeviceExperts
    from moeflow.store.predict import make_engine_predictor

    cfg = StoreConfig(expert_memory=budget, policy=policy, prefetch=prefetch, on_miss=miss)
    a = llm.args
    dev = DeviceExperts(llm.loaded.experts, slot_spec(cfg, a, torch.float32), "cpu", cfg.on_miss)
    dev.predictor = make_engine_predictor(
        prefetch, llm.loaded.model, a.moe_layers, a.moe.n_experts, a.moe.top_k
    )
    check_budget(dev)
    on_host = []
    weights = dev._weights
    dev._weights = lambda keys: on_host.append(len(dev.on_host)) or weights(keys)
    llm.loaded.experts = dev
    return on_host


@pytest.mark.parametrize("host", ["resident", "tiered"])
@pytest.mark.parametrize("miss", ["copy", "cpu"])
@pytest.mark.parametrize("prefetch", ["none", "lookahead"])
def test_device_tier_is_exact(top1_model, reference, host, miss, prefetch):
    """One expert in the device tier for all layers (every step evicts), over every expert in RAM
    or over a RAM tier of two experts that itself reads the disk."""
    two = 2 * expert_bytes(top1_model)
    llm = LLM(top1_model, progress=False, **({"expert_memory": two} if host == "tiered" else {}))
    on_host = on_device_tier(llm, expert_bytes(top1_model), miss, prefetch)
    tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    logits = torch.cat([w.logits for w in run_windows(llm.loaded, WINDOWS, batch=2, progress=False)])
    assert_same((tokens, logits), reference["top1"])
    s = llm.expert_stats()
    assert s["misses"] > 0 and s["bytes_read"] >= s["misses"] * expert_bytes(top1_model)
    assert s["on_miss"] == miss and ("host" in s) == (host == "tiered")
    assert (sum(on_host) > 0) == (miss == "cpu")  # misses were computed from the host's copy


def test_device_tier_over_top4_batches_is_exact(chat_model, reference):
    """Batches whose tokens use more experts than the device holds run in groups."""
    llm = LLM(chat_model, progress=False)
    on_device_tier(llm, 4 * expert_bytes(chat_model), "cpu", "lookahead", policy="lru")
    tokens = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    logits = torch.cat([w.logits for w in run_windows(llm.loaded, WINDOWS, batch=2, progress=False)])
    assert_same((tokens, logits), reference["top4"])


def test_device_tier_bad_configs(chat_model):
    with pytest.raises(ConfigError, match="host-memory budgets the RAM tier"):
        LLM(chat_model, progress=False, expert_memory="50%", host_memory="50%")
    with pytest.raises(ConfigError, match="on-miss must be copy or cpu"):
        LLM(chat_model, progress=False, expert_memory="50%", on_miss="gpu")
    llm = LLM(chat_model, progress=False, expert_memory=4 * expert_bytes(chat_model))
    with pytest.raises(ConfigError, match="give the host at least the device's budget"):
        on_device_tier(llm, 8 * expert_bytes(chat_model), "copy", "none")


def test_direct_layout_only_where_reads_can_land_in_place():
    """Reads go straight into the slots only where every expert is one run, in the slots' dtype,
    with [gate | up] adjacent and each matrix 64-byte aligned in the file."""
    from moeflow.store.aio_direct import direct_layout
    from moeflow.store.extents import ExpertMap, Run

    I, H, f = 4, 16, Path("m.safetensors")
    m = I * H * 4  # bytes of one fp32 matrix

    def emap(*runs, dtype=torch.float32):
        return ExpertMap({(0, e): list(r) for e, r in enumerate(runs)}, dtype, 3 * I * H)

    per_expert = [(2 * I * H, m), (0, m), (I * H, m)]  # safetensors' order: down, gate, up
    good = emap([Run(f, 4096, 3 * m, tuple(per_expert))], [Run(f, 4096 + 3 * m, 3 * m, tuple(per_expert))])
    assert direct_layout(good, torch.float32, I, H) == (m, 0)
    assert direct_layout(good, torch.bfloat16, I, H) is None  # converted on the way: bounce buffers
    assert direct_layout(emap([Run(f, 4100, 3 * m, tuple(per_expert))]), torch.float32, I, H) is None
    swapped = ((2 * I * H, m), (I * H, m), (0, m))  # up before gate: no [gate | up] view
    assert direct_layout(emap([Run(f, 4096, 3 * m, swapped)]), torch.float32, I, H) is None
    split_runs = [Run(f, 4096, m, ((0, m),)), Run(f, 8192, 2 * m, ((I * H, m), (2 * I * H, m)))]
    assert direct_layout(emap(split_runs), torch.float32, I, H) is None
    fused = ((0, 2 * m), (2 * I * H, m))  # gate_up in one piece, then down
    assert direct_layout(emap([Run(f, 4096, 3 * m, fused)]), torch.float32, I, H) == (0, 2 * m)
