"""A budgeted cache of experts in accelerator memory over a host store.

The slow tier is the host: every expert in pinned RAM (ResidentExperts), or, when RAM cannot
hold them either, a TieredExperts over the checkpoint files (disk beyond RAM). The fast tier is
a fixed set of slots on the device.

On CUDA the copies run on a side stream. Each copy records an event, and the compute stream
waits on it before the layer that uses the expert runs: the CPU never blocks on a copy, and a
prefetch for the next layer overlaps the current layer's kernels. A slot is refilled only after
the compute that last read it: an event is recorded on the compute stream at every fetch, and a
copy into a slot waits on that slot's last one.

miss="cpu" computes a demand-missed expert on the CPU from the host copy, where the weights
already are, instead of waiting for the transfer (Fiddler's and ktransformers' idea: moving a
token's activations is far cheaper than moving an expert). The copy still starts, so the expert
is on the device for later tokens. `run_experts` computes each expert on its weights' device.

Without CUDA (device="cpu") the same bookkeeping runs with synchronous copies: that is how the
tests check, on any machine, that this tier never changes what the model computes. On CUDA the
reported stall counts only what the CPU waited for (a tiered host's disk reads); the GPU's own
waits on copy events need a CUDA profiler to see."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .cached import CachedExperts, SlotSpec


class DeviceExperts(CachedExperts):
    def __init__(self, host, spec: SlotSpec, device="cuda", miss: str = "copy"):
        host_cap = getattr(host, "at_once", None)
        if host_cap is not None and host_cap < spec.capacity.size:
            raise ConfigError(
                f"the host tier holds {host_cap} experts at once, fewer than the device tier's "
                f"{spec.capacity.size}: give the host at least the device's budget"
            )
        super().__init__(spec, device=device)
        self.host, self.device, self.miss = host, torch.device(device), miss
        # a tiered host may refill the slot a copy reads from with its next fetch: copy out first
        self.wait_host = isinstance(host, CachedExperts)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: dict[int, torch.cuda.Event] = {}  # key -> its copy's event, not yet waited on
        self.last_use: dict[int, torch.cuda.Event] = {}  # slot -> after the compute that last read it
        self.on_host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this fetch's CPU-computed keys
        self.moved = 0

    # its experts are computed by torch where they are, on the device: nothing to stage
    fetch_staged = None

    @property
    def bytes_moved(self) -> int:
        return self.moved

    @property
    def read_mode(self) -> str:
        where = "pinned RAM" if self.cuda else "RAM"
        return f"{where} -> {self.device.type} copies" + (" on a side stream" if self.cuda else "")

    def fetch(self, layer: int, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.cuda and len(self.in_use):  # the previous fetch's kernels are all enqueued by now
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            for key in self.in_use:
                self.last_use[int(self.slot_of[key])] = done
        return super().fetch(layer, ids)

    def _host_weights(self, keys: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The host's copies of keys (all of one layer), in one host fetch so that a tiered host
        holds them all at once."""
        layer = self.layers[keys[0] // self.n_experts]
        return self.host.fetch(layer, [k % self.n_experts for k in keys])

    def _copy(self, key: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        slot = int(self.slot_of[key])
        dst13, dst2 = self.slot_views[slot]
        self.moved += (w13.numel() + w2.numel()) * w13.element_size()
        if not self.cuda:
            dst13.copy_(w13)
            dst2.copy_(w2)
            return
        used = self.last_use.pop(slot, None)
        if used is not None:
            self.stream.wait_event(used)  # the slot's previous expert is no longer being read
        with torch.cuda.stream(self.stream):
            dst13.copy_(w13, non_blocking=True)
            dst2.copy_(w2, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if self.wait_host:
            done.synchronize()
        else:
            self.ready[key] = done

    def _load(self, keys: list[int]) -> None:
        if not keys:
            return
        for key, (w13, w2) in zip(keys, self._host_weights(keys)):
            if self.miss == "cpu":
                self.on_host[key] = (w13, w2)  # compute there now; the copy serves later tokens
            self._copy(key, w13, w2)

    def _start(self, key: int) -> None:
        ((w13, w2),) = self._host_weights([key])
        self._copy(key, w13, w2)

    def _arrive(self, keys: list[int]) -> None:
        for key in keys:
            if key in self.on_host:
                continue  # computed on the host this time: nothing to wait for
            done = self.ready.pop(key, None)
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)

    def _cancel(self, key: int) -> None:
        # a copy still in flight into this slot is ordered before any later copy into it (one
        # side stream), and no compute will read it: forgetting its event is enough
        self.ready.pop(key, None)
        self.on_host.pop(key, None)

    def _weights(self, keys: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = [self.on_host.get(k) or self._views(k) for k in keys]
        self.on_host.clear()
        return out

    def report(self) -> dict:
        r = super().report()
        r["on_miss"] = self.miss
        host = getattr(self.host, "report", None)
        if host is not None:
            r["host"] = host()
        return r

    def close(self) -> None:
        close = getattr(self.host, "close", None)
        if close is not None:
            close()


def pinned(store) -> None:
    """Moves a ResidentExperts' buffers into page-locked memory, so host-to-device copies are
    asynchronous DMA (from pageable memory CUDA copies synchronously through a staging buffer)."""
    for layer, buf in list(store.buffers.items()):
        store.buffers[layer] = buf.pin_memory()
        store._views[layer] = store._split(store.buffers[layer])
