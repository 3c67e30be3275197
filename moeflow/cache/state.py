"""Which experts are resident in a fast tier: membership, capacity and counters of one expert cache.

The cache knows nothing of weights or of the model: it answers which (layer, expert) keys must be
loaded and which left, and a Policy ranks the eviction candidates. Keys are flat ints
`layer * n_experts + expert`, layer being the index among the MoE layers (0..L-1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .capacity import CacheCapacity
from .native import twin
from .policies import Policy

_NONE = np.zeros(0, dtype=np.int64)


@dataclass
class CacheStats:
    accesses: int = 0  # demand accesses: one per expert per token-layer
    hits: int = 0  # demand accesses that found the key resident (prefetch hits included)
    misses: int = 0  # demand accesses that had to load the key before the layer could run
    evictions: int = 0
    prefetches: int = 0  # keys brought in ahead of their use
    prefetch_hits: int = 0  # demand hits on a prefetched key, at its first use
    wasted_prefetches: int = 0  # prefetched keys evicted before any use

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def loads(self) -> int:
        """Keys moved from the slow tier: demand misses and prefetches."""
        return self.misses + self.prefetches

    def to_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate, "loads": self.loads}


@dataclass
class Access:
    """What one request or prefetch did: per-row counts, and the keys that came and went."""

    hits: np.ndarray  # [n] keys already resident
    misses: np.ndarray  # [n] keys loaded now (on demand, or for a prefetch its transfers)
    prefetch_hits: np.ndarray  # [n] demand hits on keys a prefetch brought in
    loaded: np.ndarray  # flat keys to copy into the fast tier
    evicted: np.ndarray  # flat keys whose slots are now free (before `loaded` takes them)


class ExpertCache:
    def __init__(
        self, n_layers: int, n_experts: int, capacity: CacheCapacity, policy: Policy, native: bool = True
    ):
        self.n_layers, self.n_experts = n_layers, n_experts
        self.capacity, self.policy = capacity, policy
        n = n_layers * n_experts
        self.resident = np.zeros(n, dtype=bool)
        self.pending = np.zeros(n, dtype=bool)  # prefetched and not yet asked for
        self.count = np.zeros(n_layers, dtype=np.int64)  # resident keys per layer
        self._protect = np.zeros(n, dtype=bool)  # in use by the current request: never a victim
        self._n = np.zeros(1, dtype=np.int64)  # resident keys in all (count.sum(), asked every request)
        # the same flags as bytes, for the one-key-at-a-time reads of the engine's paths
        self._res, self._pend = _bytes(self.resident), _bytes(self.pending)
        self.stats = CacheStats()
        # the engine's paths in one native call, where the policy has one (cache.native)
        self._native = twin(self) if native else None

    @property
    def _total(self) -> int:
        return int(self._n[0])

    @_total.setter
    def _total(self, n: int) -> None:
        self._n[0] = n

    def __len__(self) -> int:
        return self._total

    def split(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat keys -> (layer indices, expert ids)."""
        return keys // self.n_experts, keys % self.n_experts

    def request(self, layer: int, ids, t: int) -> Access:
        """Layer `layer` of token t runs on experts `ids` (-1 = unused slot; a repeated id is one
        key): all must be resident. The engine's path, once per MoE layer per step: the same as
        `request_layers` with one row, written for a handful of keys, where each numpy call costs
        more than the arithmetic (several µs each between the model's kernels), so membership is
        read and written one key at a time through byte views of the flag arrays."""
        if self._native is not None:
            return self._native.request(layer, ids, t)
        keys = self._keys(layer, ids)
        self.capacity.check_fits(len(keys), "experts of one layer-step")
        res, pend = self._res, self._pend
        new = [k for k in keys if not res[k]]
        first_use = [k for k in keys if pend[k]]  # (pending keys are resident)
        evicted = self._make_room_one(layer, len(new), keys)
        if new:
            self._insert_one(layer, new, t)
        for k in first_use:
            pend[k] = False
        self.policy.touch(np.array(keys, dtype=np.int64), t)
        s = self.stats
        n_hit = len(keys) - len(new)
        s.accesses, s.hits, s.misses = s.accesses + len(keys), s.hits + n_hit, s.misses + len(new)
        s.prefetch_hits += len(first_use)
        return Access(
            np.array([n_hit]), np.array([len(new)]), np.array([len(first_use)]), _array(new), evicted
        )

    def request_lists(self, layer: int, ids, t: int) -> tuple[list[int], list[int]]:
        """request's keys loaded and evicted, as lists (all the engine's fetch reads of it)."""
        if self._native is not None:
            return self._native.request_lists(layer, ids, t)
        acc = self.request(layer, ids, t)
        return acc.loaded.tolist(), acc.evicted.tolist()

    def prefetch_lists(self, layer: int, ids, t: int, protect=None) -> tuple[list[int], list[int]]:
        """prefetch's keys loaded and evicted, as lists."""
        if self._native is not None:
            return self._native.prefetch_lists(layer, ids, t, protect)
        acc = self.prefetch(layer, ids, t, protect)
        return acc.loaded.tolist(), acc.evicted.tolist()

    def request_layers(self, layers: np.ndarray, ids: np.ndarray, t: int) -> Access:
        """Several distinct layers of token t at once ([n] layers, [n, K] ids). Only a per-layer
        cache accepts more than one: its layers never compete, so their order does not matter."""
        rows, keys = self._flat(layers, ids)
        self._check_fits(layers, rows, keys, prefetch=False)
        hit = self.resident[keys]
        first_use = hit & self.pending[keys]
        new = keys[~hit]
        evicted = self._make_room(layers, np.bincount(rows[~hit], minlength=len(layers)), keys)
        self._insert(new, t)
        self.pending[keys[first_use]] = False
        self.policy.touch(keys, t)
        s = self.stats
        s.accesses, s.hits, s.misses = s.accesses + len(keys), s.hits + int(hit.sum()), s.misses + len(new)
        s.prefetch_hits += int(first_use.sum())
        n = len(layers)
        return Access(
            _per_row(rows, hit, n), _per_row(rows, ~hit, n), _per_row(rows, first_use, n), new, evicted
        )

    def all_resident(self, layer: int, ids) -> bool:
        """Whether every expert `ids` of `layer` is resident (-1 ignored): a prefetch of them would
        do nothing, and the engine asks after every layer."""
        res, base = self._res, layer * self.n_experts
        return all(res[base + e] for e in ids if 0 <= e < self.n_experts)

    def prefetch(self, layer: int, ids, t: int, protect=None) -> Access:
        """Bring in experts `ids` of `layer` ahead of token t's use, counting no demand access.
        `protect`: keys in use right now (the running layer's), which must stay. The engine's
        path, like `request`."""
        if self._native is not None:
            return self._native.prefetch(layer, ids, t, protect)
        keys = self._keys(layer, ids)
        held = keys if protect is None or not len(protect) else keys + [int(k) for k in protect]
        if self.capacity.per_layer is not None:  # (per layer, only this layer's keys compete)
            held = [k for k in held if k // self.n_experts == layer]
        self.capacity.check_fits(len(set(held)), "experts of a prefetch and of the layer running")
        res, pend = self._res, self._pend
        new = [k for k in keys if not res[k]]
        evicted = self._make_room_one(layer, len(new), held)
        if new:
            self._insert_one(layer, new, t)
            for k in new:
                pend[k] = True
        self.stats.prefetches += len(new)
        return Access(
            np.array([len(keys) - len(new)]), np.array([len(new)]), np.zeros(1, int), _array(new), evicted
        )

    def prefetch_layers(
        self, layers: np.ndarray, ids: np.ndarray, t: int, protect: np.ndarray | None = None
    ) -> Access:
        rows, keys = self._flat(layers, ids)
        held = np.union1d(keys, protect) if protect is not None else keys
        self._check_fits(layers, rows, held, prefetch=True)
        absent = ~self.resident[keys]
        new = keys[absent]
        evicted = self._make_room(layers, np.bincount(rows[absent], minlength=len(layers)), held)
        self._insert(new, t)
        self.pending[new] = True
        self.stats.prefetches += len(new)
        n = len(layers)
        return Access(_per_row(rows, ~absent, n), _per_row(rows, absent, n), np.zeros(n, int), new, evicted)

    def drop(self, keys: np.ndarray) -> np.ndarray:
        """Removes keys whose bytes did not arrive (a failed read); returns those that were in."""
        keys = np.asarray(keys, dtype=np.int64)
        keys = keys[self.resident[keys]]
        if len(keys):
            self.resident[keys] = False
            self.pending[keys] = False
            self.count -= np.bincount(keys // self.n_experts, minlength=self.n_layers)
            self._total -= len(keys)
            self.policy.forget(keys)
        return keys

    def _keys(self, layer: int, ids) -> list[int]:
        """One layer's expert ids (-1 = unused) -> their distinct flat keys, in first-seen order."""
        E, base = self.n_experts, layer * self.n_experts
        keys = []
        for e in ids.tolist() if hasattr(ids, "tolist") else ids:  # (ndarray, tensor or list)
            e = int(e)
            if e >= E:
                raise ValueError(f"expert id {e} out of range for {E} experts")
            if e >= 0 and base + e not in keys:  # (a token running fewer than k repeats one)
                keys.append(base + e)
        return keys

    def _flat(self, layers: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Valid slots of [n, K] ids -> (row of each, flat key of each)."""
        layers = np.asarray(layers, dtype=np.int64)
        ids = np.asarray(ids).reshape(len(layers), -1)
        valid = ids >= 0
        rows = np.nonzero(valid)[0]
        chosen = ids[valid].astype(np.int64)
        if chosen.size and chosen.max() >= self.n_experts:
            raise ValueError(f"expert id {chosen.max()} out of range for {self.n_experts} experts")
        return rows, layers[rows] * self.n_experts + chosen

    def _check_fits(self, layers: np.ndarray, rows: np.ndarray, held: np.ndarray, prefetch: bool) -> None:
        what = "experts of a prefetch and of the layer running" if prefetch else "experts of one layer-step"
        if self.capacity.per_layer is None:
            if len(layers) > 1:
                raise ValueError("a globally shared cache takes one layer per request")
            self.capacity.check_fits(len(held), what)
        elif len(rows):
            if len(np.unique(layers)) < len(layers):
                raise ValueError("a request names the same layer twice")
            self.capacity.check_fits(int(np.bincount(rows).max()), what)

    def _make_room_one(self, layer: int, incoming: int, held: list[int]) -> np.ndarray:
        """_make_room for one layer's `incoming` new keys, its fit check in plain ints."""
        cap = self.capacity
        if cap.per_layer is None:
            need = self._total + incoming - cap.total
        else:
            need = int(self.count[layer]) + incoming - cap.per_layer
        if need <= 0:  # most requests fit: no victim search (the engine asks every layer)
            return _NONE
        return self._evict_for(np.array([layer]), np.array([incoming]), held)

    def _insert_one(self, layer: int, new: list[int], t: int) -> None:
        res = self._res
        for k in new:
            res[k] = True
        self.count[layer] += len(new)
        self._total += len(new)
        self.policy.admit(np.array(new, dtype=np.int64), t)

    def _make_room(self, layers: np.ndarray, incoming: np.ndarray, held: np.ndarray) -> np.ndarray:
        """Evicts what `incoming` new keys per row need, never a key of `held`; returns the victims."""
        cap = self.capacity  # most requests fit: skip the victim search (the engine asks every layer)
        if cap.per_layer is None:
            if self._total + int(incoming.sum()) <= cap.total:
                return _NONE
        elif (self.count[layers] + incoming <= cap.per_layer).all():
            return _NONE
        return self._evict_for(layers, incoming, held)

    def _evict_for(self, layers: np.ndarray, incoming: np.ndarray, held) -> np.ndarray:
        """Evicts what `incoming` new keys per row need (there is a need), never a key of `held`."""
        self._protect[held] = True
        try:
            if self.capacity.per_layer is not None:
                victims = self._victims_per_layer(layers, incoming)
            else:
                victims = self._victims_global(int(incoming.sum()))
        finally:
            self._protect[held] = False
        self._evict(victims)
        return victims

    def _evict(self, victims: np.ndarray) -> None:
        if not len(victims):
            return
        res, pend, s = self._res, self._pend, self.stats
        for k in victims.tolist():  # (a few per request: cheaper one by one than as array ops)
            res[k] = False
            if pend[k]:
                pend[k] = False
                s.wasted_prefetches += 1
            self.count[k // self.n_experts] -= 1
        self._total -= len(victims)
        self.policy.forget(victims)
        s.evictions += len(victims)

    def _victims_per_layer(self, layers: np.ndarray, incoming: np.ndarray) -> np.ndarray:
        need = self.count[layers] + incoming - self.capacity.per_layer
        full = np.flatnonzero(need > 0)
        if not len(full):
            return _NONE
        E = self.n_experts
        block = layers[full][:, None] * E + np.arange(E)  # [r, E] every key of each full layer
        rank = self.policy.priority(block.ravel()).reshape(block.shape)
        rank = np.where(self.resident[block] & ~self._protect[block], rank, np.inf)
        return block[_lowest(rank, need[full])]

    def _victims_global(self, incoming: int) -> np.ndarray:
        need = len(self) + incoming - self.capacity.total
        if need <= 0:
            return _NONE
        candidates = np.flatnonzero(self.resident > self._protect)  # resident and not protected
        rank = self.policy.priority(candidates)
        if need <= 4:  # (a token's misses in one layer: a few argmins beat a sort of every key)
            chosen = []
            for _ in range(need):
                i = int(rank.argmin())  # the first of equals, as the stable sort below
                if rank[i] == np.inf:  # (only infinite ranks left: marking no longer works)
                    break
                chosen.append(i)
                rank[i] = np.inf  # (the policy's rank array is fresh: ours to mark)
            else:
                return candidates[sorted(chosen)]
            rank[chosen] = -np.inf  # (taken first again below, in the same order of keys)
        # a stable sort puts the lower key first among equal ranks, as _lowest does; on one row of
        # a few hundred keys it is several times cheaper than _lowest's partition and masks
        return candidates[np.sort(np.argsort(rank, kind="stable")[:need])]

    def _insert(self, keys: np.ndarray, t: int) -> None:
        if len(keys):
            self.resident[keys] = True
            self.count += np.bincount(keys // self.n_experts, minlength=self.n_layers)
            self._total += len(keys)
            self.policy.admit(keys, t)


def _bytes(flags: np.ndarray) -> memoryview:
    """A bool array's memory as a writable view of one byte per flag: indexing it from Python
    costs tens of ns, a numpy scalar read or write a few hundred."""
    return flags.view(np.uint8).data.cast("B")


def _array(keys: list[int]) -> np.ndarray:
    return np.array(keys, dtype=np.int64) if keys else _NONE


def _per_row(rows: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(rows[mask], minlength=n)


def _lowest(rank: np.ndarray, need: np.ndarray) -> np.ndarray:
    """[r, n] bool: the need[i] lowest ranks of each row i; among equal ranks the lower column goes
    first. A partition finds each row's threshold, cheaper than sorting the rows."""
    if (need == 1).all():  # the usual case; argmin takes the first of equals
        mask = np.zeros(rank.shape, dtype=bool)
        mask[np.arange(len(need)), rank.argmin(axis=1)] = True
        return mask
    threshold = np.partition(rank, np.unique(need) - 1, axis=1)[np.arange(len(need)), need - 1][:, None]
    below = rank < threshold
    tie = rank == threshold
    return below | (tie & (np.cumsum(tie, axis=1) <= need[:, None] - below.sum(1, keepdims=True)))
