"""A Hugging Face checkpoint folder: config.json plus one or many safetensors files.

Headers are checked against file sizes up front, so a truncated download fails at open with the
file named, not halfway through loading with an opaque error."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def safetensors_header(path: Path) -> dict:
    """Parses the header and checks that the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name} has a corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: header promises {8 + n + end} bytes, file has {size}"
        )
    return header


TENSOR_DTYPES = {  # safetensors dtype names -> torch
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


def _data_start(path: Path) -> int:
    """Byte offset of a safetensors file's data: offsets in its header count from here."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(f"model path does not exist: {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"model path is not a folder: {self.path}")
        self.config = read_json(self.path / "config.json", "config.json")
        self.files = self._shard_files()
        self._where: dict[str, Path] = {}
        self.header: dict[str, dict] = {}
        for f in self.files:
            for name, meta in safetensors_header(f).items():
                if name != "__metadata__":
                    self._where[name] = f
                    self.header[name] = meta
        self._starts = {f: _data_start(f) for f in self.files}
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX
        if index.exists():
            names = sorted(set(read_json(index, INDEX).get("weight_map", {}).values()))
            missing = [n for n in names if not (self.path / n).exists()]
            if missing:
                raise CheckpointError(f"{INDEX} lists missing shard(s): {', '.join(missing)}")
            files = [self.path / n for n in names]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        return files

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.header[name]["data_offsets"]
        return end - start

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def offset(self, name: str) -> int:
        """Byte offset of tensor `name`'s data in its file."""
        return self._starts[self._where[name]] + self.header[name]["data_offsets"][0]

    def read(self, name: str) -> torch.Tensor:
        """A private copy of a tensor, read with pread rather than mapped: nothing of the file
        stays mapped (a file truncated later cannot SIGBUS the process, and peak RSS holds one
        copy of the weights, not the mapping's pages and the copy)."""
        meta = self.header.get(name)
        if meta is None or meta["dtype"] not in TENSOR_DTYPES:
            return self.get(name).clone()
        f = self._where[name]
        start, end = meta["data_offsets"]
        out = torch.empty(meta["shape"], dtype=TENSOR_DTYPES[meta["dtype"]])
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(f, "rb", buffering=0) as fh:
            got = os.preadv(fh.fileno(), [view], self.offset(name)) if end > start else 0
        if got != end - start:
            raise CheckpointError(f"{f.name} ended early reading {name} (file truncated or replaced)")
        return out

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        handle = self._handles.get(f)
        if handle is None:
            try:
                handle = self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {f.name}: {e}") from None
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class MemoryCheckpoint:
    """Tensors already in memory behind Checkpoint's reading interface (conversion and calibration)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], path: str | Path = "<memory>"):
        self.config, self.tensors, self.path = config, tensors, Path(path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        return self.tensors[name]

    read = get  # already private memory

    def close(self) -> None:
        pass
