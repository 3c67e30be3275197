"""Native kernels (small-M linear, fused experts; decode-step norms and attention in decode.c;
cache decisions in cache.c; the tiered store's per-layer step in store.c), compiled on first use
with the machine's C compiler.

Falls back to torch (returns None from `native()`) when there is no compiler, the CPU lacks
AVX2/FMA/F16C, or MOEFLOW_NATIVE=0; results are the same up to float rounding either way."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("linear.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = tuple(_DTYPES)  # what the native kernels read
_NEEDS = ("avx2", "fma", "f16c")


def _cpu_ok() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in _NEEDS)


def _build_dir() -> Path:
    from ..default_model import cache_dir

    return cache_dir() / "kernels"


def _compile(src_path: Path, flags: list[str]) -> Path | None:
    """The shared library built from one C file with these flags (cached by their hash), or None
    without a compiler or when the build fails."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    src = src_path.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *flags, platform.node()]).encode()).hexdigest()[:16]
    out = _build_dir() / f"mf_{src_path.stem}_{tag}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            r = subprocess.run([cc, *flags, "-o", str(tmp), str(src_path)], capture_output=True, text=True)
            if r.returncode != 0:
                return None
            tmp.rename(out)
    except OSError:  # (a cache directory that cannot be written)
        return None
    return out


@cache
def native_cache():
    """The cache-decision library (cache.c), or None without a compiler or with MOEFLOW_NATIVE=0.
    Plain C and libm: no CPU feature is needed, and no floating-point contraction is allowed
    (its float state must match numpy's bit for bit)."""
    return _plain("cache.c", ["-ffp-contract=off"])


@cache
def native_aio():
    """Linux AIO submission and reaping in one call a batch (aio.c), or None as native_cache."""
    return _plain("aio.c", []) if platform.system() == "Linux" else None


@cache
def native_store():
    """One MoE layer's store step in one call (store.c: cache decision, slots, AIO reads into
    them), or None as native_aio."""
    lib = _plain("store.c", []) if platform.system() == "Linux" else None
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mf_store_open.argtypes = lib.mf_store_close.argtypes = [ptr]
    lib.mf_store_open.restype, lib.mf_store_close.restype = i64, None
    lib.mf_store_fetch.argtypes = [ptr, i64, ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr]
    lib.mf_store_fetch.restype = i64
    lib.mf_store_wait.argtypes = [ptr, i64, ptr, i64]
    lib.mf_store_prefetch.argtypes = [ptr, i64, ptr, i64]
    lib.mf_store_release.argtypes = [ptr, ptr, i64]
    lib.mf_store_wait.restype = lib.mf_store_prefetch.restype = lib.mf_store_release.restype = ctypes.c_int
    return lib


def _plain(name: str, flags: list[str]):
    if os.environ.get("MOEFLOW_NATIVE", "1") == "0":
        return None
    out = _compile(_SRC.with_name(name), ["-O2", *flags, "-shared", "-fPIC"])
    try:
        return None if out is None else ctypes.CDLL(str(out))
    except OSError:  # (a cache directory mounted noexec)
        return None


def _simd(src: Path, flags: list[str]):
    """A library built from one of the AVX2 kernel files with -fopenmp (loaded into a process
    that has torch, it binds torch's libgomp.so.1), or None where the native path is off, the
    CPU lacks the instructions, or the build or load fails."""
    if os.environ.get("MOEFLOW_NATIVE", "1") == "0" or not _cpu_ok():
        return None
    out = _compile(src, flags)
    try:
        return None if out is None else ctypes.CDLL(str(out))
    except OSError:  # (a cache directory mounted noexec)
        return None


@cache
def native():
    """The loaded library, or None when the native path is unavailable."""
    lib = _simd(_SRC, _FLAGS)
    if lib is None:
        return None
    ptr, i64, P = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p)
    lib.mf_linear.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.mf_linear.restype = None
    lib.mf_moe_token.argtypes = [i64, P, P, ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.mf_moe_token.restype = None
    lib.mf_mlp_token.argtypes = [*[ptr] * 7, i64, i64, ctypes.c_int]
    lib.mf_mlp_token.restype = None
    shared = [ptr, ptr, ptr, i64]
    routing = [ptr, i64, ptr]
    lib.mf_moe_layer_token.argtypes = [
        i64,
        ptr,
        ptr,
        ptr,
        i64,
        *shared,
        *[ptr] * 5,
        i64,
        i64,
        ctypes.c_int,
        *routing,
    ]
    lib.mf_moe_layer_token.restype = None
    lib.mf_moe_token_part.argtypes = [
        i64,
        i64,
        ptr,
        P,
        P,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        i64,
        i64,
        ctypes.c_int,
    ]
    lib.mf_moe_token_part.restype = None
    lib.mf_moe_grouped.argtypes = [i64, P, P, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.mf_moe_grouped.restype = None
    lib.mf_topk_logits.argtypes = [ptr, ctypes.c_int, ptr, ptr, i64, i64, i64, ptr, ptr]
    lib.mf_topk_logits.restype = None
    return lib


@cache
def native_decode():
    """The decode-step library (decode.c: RMSNorm rows, rope, one-token attention), or None as
    native()."""
    lib = _simd(_SRC.with_name("decode.c"), [*_FLAGS, "-ffp-contract=off"])  # (rope: bit for bit)
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mf_rmsnorm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.mf_rmsnorm.restype = None
    lib.mf_decode_attn.argtypes = [*[ptr] * 7, *[i64] * 8, ctypes.c_float, ptr, ctypes.c_int]
    lib.mf_decode_attn.restype = ctypes.c_int
    lib.mf_rope.argtypes = [*[ptr] * 4, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.mf_rope.restype = None
    return lib


def native_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary.apply for x [T, heads, dim] (contiguous; cos, sin [T, dim / 2] of x's dtype): the
    same bits as its torch ops, in one call."""
    T, heads, dim = x.shape
    out = torch.empty_like(x)
    ptrs = [t.data_ptr() for t in (x, cos, sin, out)]
    native_decode().mf_rope(*ptrs, T, heads, dim, int(interleaved), _DTYPES[x.dtype])
    return out


def native_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over x's last dim (x contiguous, w of x's dtype): the statistics in fp32, the
    normalised row rounded to x's dtype, then scaled by w, as the reference computes it."""
    out = torch.empty_like(x)
    H = x.shape[-1]
    rows = x.numel() // H
    native_decode().mf_rmsnorm(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, H, eps, _DTYPES[x.dtype])
    return out


def native_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One new token per row: q [B, h, d], k [B, kv, d], v [B, kv, dv] (contiguous, one dtype)
    -> [B, h * dv]. Writes k and v at position lens[b] - 1 of cache slot slots[b] (caches
    [n_slots, max_len, kv, d|dv], contiguous), then attends over that slot's first lens[b]
    positions (the last `window` of them, if given)."""
    B, h, d = q.shape
    kv, dv = v.shape[1], v.shape[2]
    n_slots, max_len = k_cache.shape[:2]
    out = torch.empty(B, h * dv, dtype=q.dtype)
    rc = native_decode().mf_decode_attn(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        lens.data_ptr(),
        n_slots,
        B,
        h,
        kv,
        d,
        dv,
        max_len,
        window or 0,
        scale,
        out.data_ptr(),
        _DTYPES[q.dtype],
    )
    if rc == -1:
        raise IndexError(
            f"decode attention: a slot or length out of range "
            f"(slots {slots.tolist()}, lengths {lens.tolist()})"
        )
    if rc:
        raise MemoryError("decode attention: no memory for its scratch")
    return out


def native_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in fp32 through the native kernel; returns fp32 [M, N]."""
    f = native().mf_linear
    M, K = x.shape
    pad = 0 if M == 1 else -M % 4  # the 2x4 tile wants whole blocks of four tokens
    x = x.float()
    if pad:
        x = torch.cat((x, x.new_zeros(pad, K)))
    x = x.contiguous()
    N = w.shape[0]
    y = torch.empty(M + pad, N, dtype=torch.float32)
    f(w.data_ptr(), x.data_ptr(), y.data_ptr(), M + pad, N, K, _DTYPES[w.dtype])
    return y[:M] if pad else y


def usable(x: torch.Tensor, w: torch.Tensor, max_rows: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] <= max_rows
        and w.dtype in _DTYPES
        and w.is_contiguous()
        and native() is not None
    )


def experts_usable(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """The fused expert kernels want hidden and 2*intermediate sizes in multiples of four and
    contiguous expert weights of a supported dtype."""
    H, I2 = x.shape[-1], w13.shape[0]
    return (
        x.device.type == "cpu"
        and w13.dtype in _DTYPES
        and H % 4 == 0
        and I2 % 4 == 0
        and w13.is_contiguous()
        and native() is not None
    )


def _token_buffers(x: torch.Tensor, n: int, I: int) -> tuple[torch.Tensor, ...]:
    """One token's input as the kernels read it, and the fp32 scratch n SwiGLU blocks of width I
    need: (x [1, H], out [1, H], gate/up rows [n * 2I], activations [n * I])."""
    f32 = torch.float32
    H = x.shape[-1]
    return (
        x.float().contiguous(),
        torch.empty(1, H, dtype=f32),
        torch.empty(n * 2 * I, dtype=f32),
        torch.empty(n * I, dtype=f32),
    )


def mlp_usable(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """One token through a SwiGLU FFN natively: the expert kernel's conditions, for three
    weights of one dtype."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and gate.dtype == up.dtype == down.dtype
        and up.is_contiguous()
        and down.is_contiguous()
        and experts_usable(x, gate)
    )


def native_mlp_token(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """x [1, H] through down [H, I] (silu(gate [I, H] x) * up [I, H] x) -> fp32 [1, H], in one
    native call: what native_moe_token computes for one expert of weight 1, bit for bit."""
    H, I = x.shape[-1], gate.shape[0]
    x, out, hbuf, act = _token_buffers(x, 1, I)
    ptrs = [t.data_ptr() for t in (gate, up, down, x, out, hbuf, act)]
    native().mf_mlp_token(*ptrs, H, I, _DTYPES[gate.dtype])
    return out


def layer_usable(
    x: torch.Tensor, layer: torch.Tensor, inter: int, shared: tuple[torch.Tensor, ...] | None
) -> bool:
    """LayerCall's conditions: one CPU token, the experts' buffer and the shared
    expert's weights contiguous in one supported dtype, widths in multiples of four."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and x.device.type == layer.device.type == "cpu"
        and layer.dtype in _DTYPES
        and layer.is_contiguous()
        and x.shape[-1] % 4 == 0
        and (2 * inter) % 4 == 0
        and (shared is None or _same_layout(layer, shared))
        and native() is not None
    )


def _same_layout(layer: torch.Tensor, shared: tuple[torch.Tensor, ...]) -> bool:
    return all(t.dtype == layer.dtype and t.is_contiguous() for t in shared) and shared[0].shape[0] % 4 == 0


class LayerCall:
    """One token x [1, H] through a whole MoE layer in one native call (mf_moe_layer_token), with
    the layer's addresses taken once: the experts in layer [E, 3 * inter * H] (each row one
    expert, [gate | up] then down, as ResidentExperts holds them), the shared expert (gate, up,
    down) if any, and optionally the router (fp32 [E', H], contiguous). Its scratch is reused,
    so one instance serves one caller at a time (a model's decode steps are sequential).

    Calling it with ids [k] (int64, each in range) and scale [k] gives fp32 (out [1, H], None)
    with the shared output added as `routed + shared`, or, with apart, (routed, shared) for a
    caller that rounds or gates it: bit for bit native_moe_token's routed sum and
    native_mlp_token's shared output. With a router the call routes first, writing the top k of
    router x (as native_linear computes it, bit for bit) into ids, best first."""

    def __init__(
        self,
        layer: torch.Tensor,
        inter: int,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        router: torch.Tensor | None = None,
    ):
        # the addresses below stay valid while these live (detached: a parameter whose .data is
        # replaced keeps the memory this call reads)
        self.keep = [t.detach() for t in (layer, *(shared or ()), *(() if router is None else (router,)))]
        self.inter, self.stride, self.dt = inter, layer.shape[1], _DTYPES[layer.dtype]
        self.base = layer.data_ptr()
        self.Is = 0 if shared is None else shared[0].shape[0]
        self.shared = (None, None, None) if shared is None else tuple(t.data_ptr() for t in shared)
        self.logits = None if router is None else torch.empty(router.shape[0], dtype=torch.float32)
        self.routing = (None, 0, None)
        if router is not None:
            self.routing = (router.data_ptr(), router.shape[0], self.logits.data_ptr())
        self._scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, x: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, apart: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        H, k = x.shape[-1], ids.shape[-1]
        width = k * self.inter + self.Is
        scratch = self._scratch.get(k)
        if scratch is None:
            f32 = torch.float32
            scratch = self._scratch[k] = (torch.empty(2 * width, dtype=f32), torch.empty(width, dtype=f32))
        x = x.float().contiguous()
        out = torch.empty(1, H, dtype=torch.float32)
        split = torch.empty(1, H, dtype=torch.float32) if apart and self.Is else None
        scale = scale.float().contiguous()
        if self.logits is None:
            ids = ids.contiguous()
        native().mf_moe_layer_token(
            k,
            ids.data_ptr(),
            scale.data_ptr(),
            self.base,
            self.stride,
            *self.shared,
            self.Is,
            x.data_ptr(),
            out.data_ptr(),
            None if split is None else split.data_ptr(),
            scratch[0].data_ptr(),
            scratch[1].data_ptr(),
            H,
            self.inter,
            self.dt,
            *self.routing,
        )
        return out, split


class ExpertPtrs:
    """The experts of one fetch as addresses, from a store that computes them natively
    (store.aio_native): what the fused kernel reads, without a tensor view per expert. The
    buffers are the store's and are reused by its next fetch. Indexing gives (w13, w2) views,
    for the paths that want tensors."""

    __slots__ = ("n", "w13", "w2", "sel_at", "n_late", "dt", "inter", "_view")

    def __init__(self, n: int, w13, w2, sel_at: int, n_late: int, dt: int, inter: int, view):
        self.n, self.w13, self.w2, self.sel_at, self.n_late = n, w13, w2, sel_at, n_late
        self.dt, self.inter, self._view = dt, inter, view  # dt: a native dtype code, -1 for none

    def fused_ok(self, x: torch.Tensor) -> bool:
        return self.dt >= 0 and x.device.type == "cpu" and x.shape[-1] % 4 == 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self._view(i % self.n)


def native_moe_token(
    x: torch.Tensor,
    scale: torch.Tensor,
    experts,
    late: Sequence[int] = (),
    settle: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One token [1, H] through experts [(w13 [2I, H], w2 [H, I])] weighted by scale [n] -> fp32 [1, H].
    late: positions of experts whose weights are still being read into place: the others are
    computed first, then settle() returns once the late ones are in, and they follow. The
    result is bit for bit the same either way (each expert's output, then one sum in order).
    experts may be an ExpertPtrs, whose own order (those in, then the late) is used."""
    if isinstance(experts, ExpertPtrs):
        return _moe_token_ptrs(x, scale, experts, settle)
    lib = native()
    n, H, I = len(experts), x.shape[-1], experts[0][1].shape[1]
    w13 = (ctypes.c_void_p * n)(*[a.data_ptr() for a, _ in experts])
    w2 = (ctypes.c_void_p * n)(*[b.data_ptr() for _, b in experts])
    x, out, hbuf, act = _token_buffers(x, n, I)
    scale = scale.float().contiguous()
    dt = _DTYPES[experts[0][0].dtype]
    if not late:
        ptrs = [t.data_ptr() for t in (scale, x, out, hbuf, act)]
        lib.mf_moe_token(n, w13, w2, *ptrs, H, I, dt)
        return out
    y = torch.empty(n * H, dtype=torch.float32)  # each expert's output, summed at the end
    bufs = [t.data_ptr() for t in (x, out, y, hbuf, act)]
    late_set = set(late)
    first = [i for i in range(n) if i not in late_set]
    sel = torch.tensor(first + sorted(late_set), dtype=torch.int64)
    if first:
        lib.mf_moe_token_part(n, len(first), sel.data_ptr(), w13, w2, None, *bufs, H, I, dt)
    settle()
    rest = sel.data_ptr() + len(first) * sel.element_size()
    lib.mf_moe_token_part(n, n - len(first), rest, w13, w2, scale.data_ptr(), *bufs, H, I, dt)
    return out


def _moe_token_ptrs(x: torch.Tensor, scale: torch.Tensor, e: ExpertPtrs, settle) -> torch.Tensor:
    lib, n, H, I = native(), e.n, x.shape[-1], e.inter
    x, out, hbuf, act = _token_buffers(x, n, I)
    scale = scale.float().contiguous()
    if not e.n_late:
        lib.mf_moe_token(n, e.w13, e.w2, *[t.data_ptr() for t in (scale, x, out, hbuf, act)], H, I, e.dt)
        return out
    y = torch.empty(n * H, dtype=torch.float32)  # each expert's output, summed at the end
    bufs = [t.data_ptr() for t in (x, out, y, hbuf, act)]
    first = n - e.n_late
    if first:
        lib.mf_moe_token_part(n, first, e.sel_at, e.w13, e.w2, None, *bufs, H, I, e.dt)
    settle()
    lib.mf_moe_token_part(n, e.n_late, e.sel_at + 8 * first, e.w13, e.w2, scale.data_ptr(), *bufs, H, I, e.dt)
    return out


def native_moe_grouped(xs: torch.Tensor, experts, counts: list[int]) -> torch.Tensor:
    """xs [P, H] (tokens gathered per expert, in the order of `experts`), counts[g] rows for
    expert g -> unweighted SwiGLU expert outputs, fp32 [P, H]."""
    lib = native()
    n, (P, H), I = len(experts), xs.shape, experts[0][1].shape[1]
    w13 = (ctypes.c_void_p * n)(*[a.data_ptr() for a, _ in experts])
    w2 = (ctypes.c_void_p * n)(*[b.data_ptr() for _, b in experts])
    off = torch.zeros(n + 1, dtype=torch.int64)
    off[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    xs = xs.float().contiguous()
    hbuf = torch.empty(P, 2 * I, dtype=torch.float32)
    act = torch.empty(P, I, dtype=torch.float32)
    y = torch.empty(P, H, dtype=torch.float32)
    ptrs = [t.data_ptr() for t in (off, xs, hbuf, act, y)]
    lib.mf_moe_grouped(n, w13, w2, *ptrs, P, H, I, _DTYPES[experts[0][0].dtype])
    return y


class TopLogits:
    """The k largest logits of one row x [1, H] against w [E, H] (+ bias), best first, in one
    native call; reuses its buffers (one per caller, single-threaded)."""

    def __init__(self, E: int, H: int, k: int):
        self.k = min(k, E)
        self.out = torch.empty(self.k, dtype=torch.int64)
        self.scratch = torch.empty(H + E, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> list[int]:
        E, H = w.shape
        b = None if bias is None else bias.data_ptr()
        out, scratch = self.out.data_ptr(), self.scratch.data_ptr()
        native().mf_topk_logits(x.data_ptr(), _DTYPES[x.dtype], w.data_ptr(), b, E, H, self.k, out, scratch)
        return self.out.tolist()
