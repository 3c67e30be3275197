"""Pads a safetensors file's header so that its tensor data starts on a page boundary.

Safetensors places tensors back to back after a JSON header whose length is rounded to 8 bytes
only, so every tensor sits at whatever offset the header length leaves. With the data starting
on a 4 KiB boundary, tensors whose sizes are multiples of 64 bytes (every matrix of the models
moeflow converts) start 64-byte aligned, and the tiered store can read an expert with O_DIRECT
straight into its cache slot: the weights then sit as aligned in the slot as in a resident
tensor, which matters because BLAS picks its kernels, and so its rounding, by pointer alignment
(store/aio_direct.py). The format allows padding the header with spaces; readers skip them."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

ALIGN = 4096


def align_data(path: Path, align: int = ALIGN) -> None:
    """Rewrites `path` in place (through a temp file) with its data starting at a multiple of align."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        if (8 + n) % align == 0:
            return
        padded = header + b" " * (-(8 + n) % align)
        tmp = path.with_name(path.name + ".aligning")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(padded)))
            out.write(padded)
            shutil.copyfileobj(f, out, 16 << 20)
    os.replace(tmp, path)
