"""Linux native AIO (io_submit / io_getevents) through raw system calls, for O_DIRECT reads.

The thread that wants bytes submits reads and later reaps their completions; the kernel does
the reading and no reader thread exists. That matters on a machine
with few cores: reader threads need the GIL for the Python around every read, between the
compute thread's ops, and their wake-ups compete with the compute threads for the cores.

Only O_DIRECT reads are truly asynchronous under Linux AIO (a buffered read completes inside
io_submit), so the store uses this only when every checkpoint file is open with O_DIRECT."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform

import numpy as np

from .. import kernels

# (io_setup, io_destroy, io_getevents, io_submit) per architecture: x86_64 has its own numbers,
# arm64 uses the generic table
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2), "arm64": (0, 1, 4, 2)}
_PREAD = 0  # IOCB_CMD_PREAD


class _Iocb(ctypes.Structure):  # struct iocb, linux/aio_abi.h, on a little-endian 64-bit machine
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


@functools.cache
def available() -> bool:
    """Whether this machine has Linux AIO (a kernel built without it, or a sandbox forbidding
    it, fails io_setup)."""
    if platform.system() != "Linux" or platform.machine() not in _SYSCALLS:
        return False
    try:
        AioQueue(1).close()
    except OSError:
        return False
    return True


class AioQueue:
    """Up to `depth` reads in flight. Tags are the caller's ints, handed back on completion."""

    def __init__(self, depth: int):
        self.setup, self.destroy, self.getevents, self.submit_nr = _SYSCALLS[platform.machine()]
        self.sys, self.depth = _syscall(), depth
        self.ctx = ctypes.c_ulong(0)
        if self.sys(self.setup, ctypes.c_long(depth), ctypes.byref(self.ctx)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup: {os.strerror(e)}")
        self.iocbs = (_Iocb * depth)()
        self.free = list(range(depth - 1, -1, -1))  # control blocks not in flight
        self.slot_of: dict[int, int] = {}  # tag -> its control block
        self.events = (_Event * depth)()
        self.in_flight = 0
        # where the native helper builds, it fills the control blocks and reaps in one call a batch
        self.lib = kernels.native_aio()
        if self.lib is not None:
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            self.lib.mf_aio_submit.argtypes = [ctypes.c_uint64, ptr, ptr, i64, ptr]
            self.lib.mf_aio_reap.argtypes = [ctypes.c_uint64, i64, i64, ptr, ptr]
            self.lib.mf_aio_submit.restype = self.lib.mf_aio_reap.restype = i64
            self._err = ctypes.c_int64(0)
            self._out = np.zeros(2 * depth, dtype=np.int64)

    def submit(self, reads: list[tuple[int, int, int, int, int]]) -> None:
        """reads: (tag, fd, buffer address, nbytes, file offset); at most len(free) of them."""
        n = len(reads)
        if n > len(self.free):
            raise ValueError(f"{n} reads submitted with {len(self.free)} free control blocks")
        blocks = []
        for tag, *_ in reads:
            j = self.free.pop()
            self.slot_of[tag] = j
            blocks.append(j)
        # one system call per read: io_submit plugs the block queue for the length of a call, so
        # in a batch the first read would not reach the disk before the last was prepared
        done, e = (self._submit_native if self.lib is not None else self._submit_ctypes)(reads, blocks)
        self.in_flight += done
        if done < n:
            for tag, *_ in reads[done:]:  # never submitted: their blocks are free again
                self.free.append(self.slot_of.pop(tag))
            raise OSError(e, f"io_submit: {os.strerror(e)}")

    def _submit_native(self, reads: list[tuple], blocks: list[int]) -> tuple[int, int]:
        """(reads submitted, errno of the one refused)."""
        flat = []
        for (tag, fd, addr, nbytes, offset), j in zip(reads, blocks):
            flat += (tag, j, fd, addr, nbytes, offset)
        iocbs, arr = ctypes.addressof(self.iocbs), (ctypes.c_int64 * len(flat))(*flat)
        done = self.lib.mf_aio_submit(self.ctx.value, iocbs, arr, len(reads), ctypes.byref(self._err))
        return done, self._err.value

    def _submit_ctypes(self, reads: list[tuple], blocks: list[int]) -> tuple[int, int]:
        done = 0
        while done < len(reads):
            tag, fd, addr, nbytes, offset = reads[done]
            cb = self.iocbs[blocks[done]]
            ctypes.memset(ctypes.byref(cb), 0, ctypes.sizeof(cb))
            cb.data, cb.opcode, cb.fildes = tag, _PREAD, fd
            cb.buf, cb.nbytes, cb.offset = addr, nbytes, offset
            arr = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(cb))
            got = self.sys(self.submit_nr, self.ctx, ctypes.c_long(1), arr)
            if got < 0:
                e = ctypes.get_errno()
                if e in (errno.EINTR, errno.EAGAIN):
                    continue
                return done, e
            done += got
        return done, 0

    def reap(self, least: int) -> list[tuple[int, int]]:
        """Waits for at least `least` completions (0: only those already done); returns
        (tag, result) pairs, result being bytes read or -errno."""
        least = min(least, self.in_flight)
        out = self._reap_native(least) if self.lib is not None else self._reap_ctypes(least)
        for tag, _ in out:
            self.free.append(self.slot_of.pop(tag))
        self.in_flight -= len(out)
        return out

    def _reap_native(self, least: int) -> list[tuple[int, int]]:
        events, out = ctypes.addressof(self.events), self._out.ctypes.data
        got = self.lib.mf_aio_reap(self.ctx.value, least, self.depth, events, out)
        if got < 0:
            raise OSError(-got, f"io_getevents: {os.strerror(-got)}")
        flat = self._out[: 2 * got].tolist()
        return list(zip(flat[::2], flat[1::2]))

    def _reap_ctypes(self, least: int) -> list[tuple[int, int]]:
        while True:
            got = self.sys(
                self.getevents, self.ctx, ctypes.c_long(least), ctypes.c_long(self.depth), self.events, None
            )
            if got >= 0:
                return [(int(ev.data), int(ev.res)) for ev in self.events[:got]]
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_getevents: {os.strerror(e)}")

    def close(self) -> None:
        if self.ctx.value:
            while self.in_flight:  # no read may still write into a buffer about to be freed
                self.reap(self.in_flight)
            self.sys(self.destroy, self.ctx)
            self.ctx = ctypes.c_ulong(0)
