"""Where each expert's bytes are in the checkpoint files, so an expert is read with positioned
reads straight into its cache slot [gate | up | down], with no safetensors parsing per load.

Tensors that lie back to back in a file (safetensors writes an expert's down, gate and up next to
each other) are read by one scatter read (`preadv` with one buffer per tensor): one request to
the disk per expert instead of three small ones: ~1.4x the cold read rate for 331 KB experts
read 8 at a time on this machine, at less CPU per expert (bench/bench_reads.py).

Per-expert layout: gate, up, down are three separate tensors. Fused layout: expert e of
`gate_up_proj [E, 2I, H]` is one contiguous run (gate then up, the slot's own order) and of
`down_proj [E, H, I]` another."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsupportedModelError
from ..loader.checkpoint import TENSOR_DTYPES, Checkpoint

_FLOATS = ("F32", "BF16", "F16")  # what an expert slot can hold


@dataclass(frozen=True)
class Extent:
    file: Path
    offset: int  # byte offset in the file
    nbytes: int
    dst: int  # element offset in the expert's slot


@dataclass(frozen=True)
class Run:
    """One positioned read: `nbytes` at `offset` of `file`, scattered over the slot's pieces."""

    file: Path
    offset: int
    nbytes: int
    pieces: tuple[tuple[int, int], ...]  # (element offset in the slot, bytes), in file order


def coalesce(extents: list[Extent]) -> list[Run]:
    """Merges extents that are contiguous in the same file into single runs."""
    runs: list[Run] = []
    for x in sorted(extents, key=lambda x: (str(x.file), x.offset)):
        last = runs[-1] if runs else None
        if last is not None and last.file == x.file and last.offset + last.nbytes == x.offset:
            runs[-1] = Run(x.file, last.offset, last.nbytes + x.nbytes, (*last.pieces, (x.dst, x.nbytes)))
        else:
            runs.append(Run(x.file, x.offset, x.nbytes, ((x.dst, x.nbytes),)))
    return runs


@dataclass
class ExpertMap:
    extents: dict[tuple[int, int], list[Run]]  # (layer, expert) -> its reads
    dtype: torch.dtype  # on disk
    numel: int  # elements of one expert (3 * I * H)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def files(self) -> list[Path]:
        return sorted({x.file for runs in self.extents.values() for x in runs})


def _dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    kind = ckpt.header[name]["dtype"]
    if kind not in _FLOATS:
        raise UnsupportedModelError(f"tensor {name} has dtype {kind}; tiered experts read F32/BF16/F16")
    return TENSOR_DTYPES[kind]


def expert_map(ckpt: Checkpoint, canon: dict, layers: list[int], E: int, I: int, H: int) -> ExpertMap:
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError("an expert memory budget needs a safetensors checkpoint folder on disk")
    out, dtypes = {}, set()

    def run(name: str, skip: int, numel: int, dst: int) -> Extent:
        dt = _dtype(ckpt, name)
        dtypes.add(dt)
        return Extent(ckpt.file_of(name), ckpt.offset(name) + skip * dt.itemsize, numel * dt.itemsize, dst)

    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts"
        fused = canon.get(f"{p}.gate_up_proj")
        for e in range(E):
            if fused:
                out[layer, e] = [
                    run(fused, e * 2 * I * H, 2 * I * H, 0),
                    run(canon[f"{p}.down_proj"], e * H * I, H * I, 2 * I * H),
                ]
            else:
                names = [canon.get(f"{p}.{e}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")]
                if None in names:
                    raise CheckpointError(f"layer {layer} expert {e} is missing from the checkpoint")
                out[layer, e] = [run(n, 0, I * H, i * I * H) for i, n in enumerate(names)]
            out[layer, e] = coalesce(out[layer, e])
    if len(dtypes) > 1:
        raise UnsupportedModelError(f"experts are stored in mixed dtypes {sorted(map(str, dtypes))}")
    return ExpertMap(out, dtypes.pop(), 3 * I * H)
