"""The in-slot AIO store (aio_direct) with each layer's store step in one native call.

Same slots, same cache decisions (the cyclic policy's native twin, cache.c), same reads and the
same bytes as AioDirectExperts; what changes is who does the bookkeeping. There, a decode layer
runs dozens of small Python and ctypes calls: the cache decision, a slot per loaded key, each
read's control block, the completions, the weight views. Here store.c does all of it in one call
per fetch, one per prefetch and one per wait, and hands the fused expert kernel the weights'
addresses (kernels.ExpertPtrs) instead of tensor views. On the 2-vCPU host that Python was ~4 ms
of a 29 ms token at a 25% budget (BENCHMARKS.md, tiered expert store).

Used where every key is one in-slot run (direct_layout), the policy is exactly Cyclic (the only
one with a native twin) and the libraries build; AioDirectExperts serves otherwise."""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import torch

from .. import kernels
from ..cache.native import NativeCyclic
from ..cache.policies import Cyclic
from ..errors import CheckpointError
from . import aio_direct
from .aio_direct import AioDirectExperts
from .cached import SlotSpec
from .extents import ExpertMap
from .reader import ALIGN, FileReader

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# mf_store's counters, in order (store.c), and where each one goes
_COUNTS = ("accesses", "hits", "misses", "prefetch_hits", "evictions", "wasted_prefetches", "prefetches")
_DEMAND_LOADS, _BYTES_READ, _DEMAND_NS = 7, 8, 9  # the rest of mf_store.count


class _Store(ctypes.Structure):  # mf_store in store.c
    _fields_ = [
        ("cache", _P),
        ("request", _P),
        ("prefetch", _P),
        ("c_loaded", _P),
        ("c_evicted", _P),
        ("c_res", _P),
        ("E", _I64),
        ("n_keys", _I64),
        ("base", ctypes.c_uint64),
        ("stride", _I64),
        ("gate_at", _I64),
        ("down_at", _I64),
        ("slot_of", _P),
        ("free_slots", _P),
        ("n_free", _I64),
        ("fd", _P),
        ("run_off", _P),
        ("run_len", _P),
        ("chunk", _I64),
        ("pending", _P),
        ("failed", _P),
        ("ctx", ctypes.c_uint64),
        ("depth", _I64),
        ("in_flight", _I64),
        ("cbs", _P),
        ("batch", _P),
        ("events", _P),
        ("cb_free", _P),
        ("n_cb_free", _I64),
        ("cb_key", _P),
        ("cb_hi", _P),
        ("in_use", _P),
        ("n_in_use", _I64),
        ("err_key", _I64),
        ("err_val", _I64),
        ("count", _I64 * 10),
        ("fail_submit", _I64),
        ("fail_read", _I64),
        ("hold", _I64),
        ("fail_reap", _I64),
    ]


def usable(spec: SlotSpec) -> bool:
    """Whether this store can serve spec: its policy is exactly Cyclic, whose native twin the
    store calls from C, and both libraries build."""
    return (
        type(spec.policy) is Cyclic
        and kernels.native_cache() is not None
        and kernels.native_store() is not None
    )


class NativeAioExperts(AioDirectExperts):
    """The C side (store.c) owns the free slots, the reads in flight and their control blocks;
    Python keeps the prediction (which layer to guess, the predictor itself) and the timings."""

    def __init__(self, emap: ExpertMap, spec: SlotSpec, reader: FileReader, layout: tuple[int, int]):
        super().__init__(emap, spec, reader, layout)
        lib = self._lib = kernels.native_store()
        twin, L, E = self.cache._native, len(self.layers), self.n_experts
        if not isinstance(twin, NativeCyclic) or lib is None:
            raise RuntimeError("the native store step needs the cyclic policy's native twin (see usable)")
        n = L * E
        fds, offs, lens = np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64)
        for key in range(n):
            (run,) = emap.extents[self.layers[key // E], key % E]  # (direct_layout: one run each)
            fds[key], offs[key], lens[key] = reader._direct[run.file], run.offset, run.nbytes
        self._fd, self._off, self._len = fds, offs, lens
        self._free = np.array(self.free, dtype=np.int64)
        self._pending, self._failed = np.zeros(n, np.int32), np.zeros(n, np.int64)
        depth = aio_direct.DEPTH  # reads in flight at most, as there
        self._cbs = (ctypes.c_uint64 * (8 * depth))()  # struct iocb: 64 bytes, 8-aligned
        self._batch = (ctypes.c_void_p * depth)()
        self._events = (ctypes.c_uint64 * (4 * depth))()  # struct io_event: 32 bytes
        self._cb_free, self._cb_key, self._cb_hi = (np.zeros(depth, np.int64) for _ in range(3))
        self._cb_free[:] = np.arange(depth)
        self._in_use = np.zeros(max(E, 64), np.int64)  # (as many as one fetch's ids: see _ids)
        addr = lambda a: a.ctypes.data  # noqa: E731
        self._st = _Store(
            ctypes.addressof(twin._state),
            ctypes.cast(twin._request, _P).value,
            ctypes.cast(twin._prefetch, _P).value,
            addr(twin._loaded),
            addr(twin._evicted),
            addr(twin._res),
            E,
            n,
            self._base,
            self._stride,
            self._gate_at,
            self._down_at,
            addr(self.slot_of),
            addr(self._free),
            len(self._free),
            addr(fds),
            addr(offs),
            addr(lens),
            self._size,  # the longest read (AioDirectExperts._buffers)
            addr(self._pending),
            addr(self._failed),
            0,
            depth,
            0,
            ctypes.addressof(self._cbs),
            ctypes.addressof(self._batch),
            ctypes.addressof(self._events),
            addr(self._cb_free),
            depth,
            addr(self._cb_key),
            addr(self._cb_hi),
            addr(self._in_use),
            0,
        )
        self._ref = ctypes.byref(self._st)
        self._broken: Exception | None = None  # why the store can no longer serve (see _fail)
        rc = lib.mf_store_open(self._ref)
        if rc < 0:
            raise OSError(-rc, f"io_setup: {os.strerror(-rc)}")
        self.free = []  # (the C side owns the free slots from here)
        # one fetch's ids in, its weights' addresses and its order (those in, then the late) out
        most = max(E, 64)
        self._ids, self._pids = np.zeros(most, np.int64), np.zeros(most, np.int64)  # (fetch, prefetch)
        self._w13, self._w2 = (ctypes.c_void_p * most)(), (ctypes.c_void_p * most)()
        self._sel = np.zeros(most, np.int64)
        self._ids_at, self._sel_at = self._ids.ctypes.data, self._sel.ctypes.data
        self._w13_at, self._w2_at = ctypes.addressof(self._w13), ctypes.addressof(self._w2)
        I2, H = 2 * spec.inter, spec.hidden
        fused = spec.dtype in kernels.DTYPES and H % 4 == 0 and I2 % 4 == 0 and kernels.native() is not None
        self._dt = kernels.DTYPES.index(spec.dtype) if fused else -1  # (-1: no fused kernel)

    def _queue(self, depth: int):
        return None  # (store.c sets up its own AIO context)

    @property
    def read_mode(self) -> str:
        return "O_DIRECT, Linux AIO, into the slots (native step)"

    @property
    def reads_in_flight(self) -> int:
        return int(self._st.in_flight)

    @property
    def queue_depth(self) -> int:
        return int(self._st.depth)

    @property
    def bytes_moved(self) -> int:
        return self.reader.bytes_read + int(self._st.count[_BYTES_READ])

    # ---- the store interface the model uses

    def _fetch(self, layer: int, ids, wait: bool, defer: bool = False) -> tuple[list[int], bool]:
        demand = self._st.count[_DEMAND_LOADS]
        self._step(layer, ids, wait)
        return self.in_use, self._st.count[_DEMAND_LOADS] != demand

    def _step(self, layer: int, ids, wait: bool) -> tuple[int, int]:
        """One native fetch of `layer`'s experts ids: (how many, how many still arriving); the
        next layer's prediction is left due (_predict_due)."""
        self._due = None  # (a prediction left over from a step that failed before settling)
        if self._broken is not None:
            raise self._broken
        li = self.index[layer]
        n = len(ids)
        if n > len(self._ids):
            raise ValueError(f"{n} experts in one fetch; the store takes at most {len(self._ids)}")
        self._ids[:n] = ids
        count = self._st.count
        demand, submit_ns = count[_DEMAND_LOADS], count[_DEMAND_NS]
        late = self._lib.mf_store_fetch(
            self._ref, li, self._ids_at, n, self.step, int(wait), self._w13_at, self._w2_at, self._sel_at
        )
        if late < 0:
            self._fail(int(late), li, n, self._ids[:n].tolist())
        if count[_DEMAND_LOADS] != demand:  # submitting demand reads counts as stall, as in the Python step
            self.stats.demand_loads += count[_DEMAND_LOADS] - demand
            took = (count[_DEMAND_NS] - submit_ns) * 1e-9
            self.stats.stall_s += took
            self.stats.demand_read_s += took
        self._after_fetch(li, layer, ids)
        return n, int(late)

    def _after_fetch(self, li: int, layer: int, ids) -> None:
        routed = self._routed
        if routed is not None and routed.layer == layer:
            routed.unfetched.difference_update(ids)
            if not routed.unfetched:  # this layer's last group is in: predict the next one
                self._routed = None
                self._due = (li, routed)

    def fetch(self, layer: int, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        try:
            st = self.stats
            stall, read, demand = st.stall_s, st.demand_read_s, self._st.count[_DEMAND_LOADS]
            n, _ = self._step(layer, ids, wait=True)
            # the whole call is a wait (the cache decision is a few µs of it); it replaces the
            # submission time _step counted
            waited = time.perf_counter() - t0
            st.stall_s = stall + waited
            if self._st.count[_DEMAND_LOADS] != demand:
                st.demand_read_s = read + waited
            self._predict_due()
            return [self._at(i) for i in range(n)]
        finally:
            self.stats.store_s += time.perf_counter() - t0

    def fetch_staged(self, layer: int, ids):
        t0 = time.perf_counter()
        try:
            demand = self._st.count[_DEMAND_LOADS]
            n, late = self._step(layer, ids, wait=False)
            demand = self._st.count[_DEMAND_LOADS] != demand
            if not late:
                self._predict_due()
        finally:
            self.stats.store_s += time.perf_counter() - t0
        ptrs = kernels.ExpertPtrs(n, self._w13, self._w2, self._sel_at, late, self._dt, self.inter, self._at)
        if not late:
            return ptrs, [], _nothing
        li = self.index[layer]
        late_pos = self._sel[n - late : n].tolist()

        def settle() -> None:
            t0 = time.perf_counter()
            self._predict_due()  # (see CachedExperts.fetch_staged)
            t1 = time.perf_counter()
            try:
                self._await(li, n)
            finally:
                waited = time.perf_counter() - t1
                self.stats.stall_s += waited
                if demand:
                    self.stats.demand_read_s += waited
                self.stats.store_s += time.perf_counter() - t0

        return ptrs, late_pos, settle

    def _await(self, li: int, n: int) -> None:
        """The last fetch's n experts of layer index li have all landed (or this raises why not)."""
        rc = self._lib.mf_store_wait(self._ref, li, self._ids_at, n)
        if rc < 0:
            self._fail(rc, li, n, self._ids[:n].tolist())

    def _at(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th expert of the last fetch, as tensor views of its slot."""
        return self._views(int(self._in_use[i]))

    def _views(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._slot_views(int(self.slot_of[key]), int(self._off[key]) % ALIGN)

    def prefetch(self, layer: int, ids) -> None:
        li = self.index[layer]
        if not len(ids):
            return
        if self._broken is not None:
            raise self._broken
        cap = self.cache.capacity
        if cap.scope == "layer":  # a model of one MoE layer prefetches into the layer running
            in_layer = int(np.count_nonzero(self._in_use[: self._st.n_in_use] // self.n_experts == li))
            ids = ids[: cap.per_layer - in_layer]
        n = min(len(ids), len(self._pids))
        self._pids[:n] = ids[:n]
        rc = self._lib.mf_store_prefetch(self._ref, li, self._pids.ctypes.data, n)
        if rc < 0:
            twin = self.cache._native  # the keys the cache admitted: none may stay without its reads
            self._fail(rc, li, n, [], drop=twin._loaded[: twin._res[1]].tolist())

    @property
    def in_use(self) -> list[int]:
        return self._in_use[: self._st.n_in_use].tolist()

    @in_use.setter
    def in_use(self, keys) -> None:
        pass  # (the C side records each fetch's keys)

    # ---- failures

    def _fail(self, rc: int, li: int, n: int, ids: list[int], drop: list[int] | None = None) -> None:
        """Raises what a native step's code means; the keys it asked for (or `drop`) leave the
        cache first, so a later request reads them afresh."""
        st = self._st
        if rc in (-1, -2, -3, -4):  # the cache's own refusals: nothing changed
            self.cache._native._check(rc, "experts of one layer-step" if drop is None else "a prefetch")
        keys = [li * self.n_experts + e for e in ids if e >= 0] if drop is None else drop
        if rc == -10:
            err = self._read_error(int(st.err_key), int(st.err_val))
        elif rc == -11:
            e = int(st.err_val)
            err = OSError(e, f"io_submit: {os.strerror(e)}")
        else:  # waiting for reads failed (-12), or slots went astray (-13)
            self._stop(
                f"io_getevents: {os.strerror(int(st.err_val))}"
                if rc == -12
                else "more experts admitted than slots"
            )
        self._invalidate(keys)
        raise err

    def _read_error(self, key: int, val: int) -> Exception:
        (run,) = self.map.extents[self.layers[key // self.n_experts], key % self.n_experts]
        if val < 0:
            return OSError(-val, f"reading {run.file.name}: {os.strerror(-val)}")
        return CheckpointError(
            f"{run.file.name} ended early: read {val - 1} of {run.nbytes} bytes at offset "
            f"{run.offset} (file truncated or replaced while running)"
        )

    def _release(self, evicted: list[int]) -> None:
        if not evicted:
            return
        keys = np.asarray(evicted, dtype=np.int64)
        rc = self._lib.mf_store_release(self._ref, keys.ctypes.data, len(keys))
        if rc < 0:  # (-12: see _fail)
            self._stop(f"io_getevents: {os.strerror(int(self._st.err_val))}")

    def _stop(self, why: str) -> None:
        """Nothing is known to be safe any more, since a read may still write into a slot: the
        store stops serving, and every later call raises the same error."""
        self._broken = RuntimeError(f"the expert store can no longer read safely ({why})")
        raise self._broken

    def report(self) -> dict:
        c, count = self.cache.stats, self._st.count
        for i, name in enumerate(_COUNTS):  # fold the C counters into the cache's statistics
            if count[i]:
                setattr(c, name, getattr(c, name) + count[i])
                count[i] = 0
        return super().report()

    def close(self) -> None:
        if self._st.ctx:
            self._lib.mf_store_close(self._ref)
        super().close()


def _nothing() -> None:
    pass
