"""Run Metal (MSL) kernels on the CPU, from tests: the emulator's Python API.

    from tests.metal.emulator import compile_metal, run_seeds
    lib = compile_metal("metal/divergence.metal", include_dirs=[...])
    out = lib.run("kl_div_float32", threadgroups=(rows, 1, 1), threads=(1024, 1, 1),
                  buffers=[x, y, np.empty(rows, np.float32), np.int32(V)], outputs=[2], seed=3)

Buffers bind in [[buffer(i)]] order: numpy arrays as `device`/`constant` pointers, numpy
scalars as `constant T&`. Arrays listed in `outputs` are poisoned (0xFF bytes: NaN for
floats, -1 for integers) before the run. Every run happens in a child process over a
shared file: each buffer sits against a PROT_NONE guard page (its end on even seeds, its
start on odd seeds; the slack is checked for stray writes), so an out-of-bounds access
is reported with buffer, element, lane and seed instead of crashing pytest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tests.metal import _build
from tests.metal._build import MetalCompileError

__all__ = ["compile_metal", "Library", "run_seeds", "MetalCompileError", "MetalRuntimeError",
           "SESSION_RUNS", "metal_include_dirs"]

PAGE = 4096
MAGIC = 0x554D454C4154454D
CANARY = 0xA5
TIMEOUT_S = float(os.environ.get("METALEMU_TIMEOUT", "300"))
# (source file, host_name) of every launch that ran to completion in this process; the
# coverage check (test_coverage.py) compares it with the [[host_name]]s in metal/*.metal.
SESSION_RUNS: set[tuple[str, str]] = set()


class MetalRuntimeError(AssertionError):
    """A kernel faulted, deadlocked or otherwise failed in the emulator."""


class _Report(ctypes.Structure):
    _fields_ = [("error", ctypes.c_int), ("fault_write", ctypes.c_int),
                ("fault_addr", ctypes.c_uint64), ("file_base", ctypes.c_uint64), ("lane_tid", ctypes.c_uint32 * 3),
                ("lane_tg", ctypes.c_uint32 * 3), ("barriers", ctypes.c_int64),
                ("simd_ops", ctypes.c_int64), ("switches", ctypes.c_int64),
                ("exited_before_barrier", ctypes.c_int64), ("msg", ctypes.c_char * 1024)]


class _File(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint64), ("threadgroups", ctypes.c_uint32 * 3),
                ("threads", ctypes.c_uint32 * 3), ("seed", ctypes.c_uint32),
                ("n_guards", ctypes.c_uint32), ("tg_bytes", ctypes.c_uint64 * 32),
                ("buffer_offset", ctypes.c_uint64 * 64), ("guard_offset", ctypes.c_uint64 * 130),
                ("n_constants", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("constants", (ctypes.c_uint32 * 4) * 32),
                ("report", _Report)]


def metal_include_dirs() -> list[str]:
    """Folders to pass as include_dirs so that `#include "mlx/backend/metal/kernels/..."`
    (MLX's own kernel headers, from the mlx wheel) and the project's metal/ resolve."""
    import mlx  # a namespace package: its folder holds include/

    root = Path(__file__).resolve().parents[2]
    return [str(Path(list(mlx.__path__)[0]) / "include"), str(root / "metal"), str(root)]


def _pages(n: int) -> int:
    return max(1, -(-n // PAGE)) * PAGE


class Library:
    """A compiled .metal file: its [[host_name]] kernels, launchable on numpy arrays."""

    def __init__(self, path: Path, built: _build.Built):
        self.path = path
        self._built = built
        self._index = {k.host_name: i for i, k in enumerate(built.kernels)}
        self._sizes: dict[str, list[int]] = {}

    def kernels(self) -> list[str]:
        """The launchable kernels: [[host_name]]s and non-template kernel names."""
        return list(self._index)

    def _arg_sizes(self, kernel: str) -> list[int]:
        if kernel not in self._sizes:
            lib = ctypes.CDLL(str(self._built.so))
            f = getattr(lib, f"metalemu_arg_sizes_{self._index[kernel]}")
            f.restype = ctypes.POINTER(ctypes.c_longlong)
            n = len(self._built.kernels[self._index[kernel]].params)
            self._sizes[kernel] = [f()[i] for i in range(n)]
        return self._sizes[kernel]

    def _check(self, kernel: str, buffers: Sequence, outputs: Iterable[int]):
        if kernel not in self._index:
            raise KeyError(f"{self.path.name}: no kernel {kernel!r}; it has {self.kernels()}")
        k = self._built.kernels[self._index[kernel]]
        sizes = self._arg_sizes(kernel)
        for p, size in zip(k.params, sizes):
            if p.kind != "buffer":
                continue
            if p.index >= len(buffers) or buffers[p.index] is None:
                raise ValueError(f"{kernel}: [[buffer({p.index})]] ({p.decl}) is not bound")
            b = buffers[p.index]
            item = np.asarray(b).dtype.itemsize
            if p.is_ref and not np.isscalar(b) and np.asarray(b).ndim != 0:
                raise ValueError(f"{kernel}: [[buffer({p.index})]] ({p.decl}) takes a numpy scalar")
            if size and item != size and not (p.is_ref and item == size):
                if not (not p.is_ref and size % item == 0 and np.asarray(b).nbytes % size == 0):
                    raise ValueError(f"{kernel}: [[buffer({p.index})]] ({p.decl}) has elements of "
                                     f"{size} bytes but got dtype {np.asarray(b).dtype}")
        for i in outputs:
            if not isinstance(buffers[i], np.ndarray):
                raise ValueError(f"{kernel}: output {i} must be a numpy array")

    def run(self, kernel: str, threadgroups=(1, 1, 1), threads=(32, 1, 1), buffers=(),
            outputs=(), seed: int = 0, threadgroup_bytes=None,
            function_constants=None) -> list[np.ndarray]:
        """Launches `kernel` on a grid of `threadgroups` x `threads`; returns every buffer
        (as arrays: inputs unchanged unless the kernel wrote them, outputs as written).
        threadgroup_bytes: bytes of [[threadgroup(0)]], or {index: bytes}.
        function_constants: {index: value} for [[function_constant(index)]] (bool/int/float)."""
        outputs = list(outputs)
        self._check(kernel, buffers, outputs)
        tg = [int(x) for x in (tuple(threadgroups) + (1, 1))[:3]]
        th = [int(x) for x in (tuple(threads) + (1, 1))[:3]]
        if threadgroup_bytes is None:
            threadgroup_bytes = {}
        elif not isinstance(threadgroup_bytes, dict):
            threadgroup_bytes = {0: int(threadgroup_bytes)}
        arrays = [np.ascontiguousarray(np.asarray(b)) if b is not None else None for b in buffers]
        if len(arrays) > 64:
            raise ValueError("at most 64 buffers")
        if min(tg) == 0:  # an empty grid runs nothing (as on a GPU)
            return [a.copy() if a is not None else None for a in arrays]

        # Layout: header page, then per buffer [guard][data pages][guard].
        end_aligned = seed % 2 == 0
        offsets, guards, places, off = [], [], [], PAGE
        for a in arrays:
            if a is None:
                places.append(None)
                continue
            n = a.nbytes
            region = _pages(n)
            guards.append(off)
            start = off + PAGE
            if end_aligned:
                align = 16 if n % 16 == 0 else a.dtype.itemsize
                data = (start + region - n) // align * align
            else:
                data = start
            places.append((start, region, data, n))
            off = start + region
        guards.append(off)
        total = off + PAGE

        fd, fname = tempfile.mkstemp(prefix="metalemu-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total)
            os.close(fd)
            hdr = _File.from_buffer(mm)
            hdr.magic = MAGIC
            hdr.threadgroups[:] = tg
            hdr.threads[:] = th
            hdr.seed = seed
            for i, b in threadgroup_bytes.items():
                hdr.tg_bytes[i] = int(b)
            for j, (i, v) in enumerate(sorted((function_constants or {}).items())):
                raw = np.array([v], dtype=np.float32 if isinstance(v, float) else np.int64)
                val = int(raw.view(np.uint32)[0]) if raw.dtype == np.float32 else int(raw[0]) & (2**64 - 1)
                hdr.constants[j][:] = [i, 8, val & 0xFFFFFFFF, val >> 32]
                hdr.n_constants = j + 1
            hdr.n_guards = len(guards)
            hdr.guard_offset[:len(guards)] = guards
            for i, (a, p) in enumerate(zip(arrays, places)):
                if p is None:
                    continue
                start, region, data, n = p
                mm[start:start + region] = bytes([CANARY]) * region
                hdr.buffer_offset[i] = data
                mm[data:data + n] = b"\xff" * n if i in outputs else a.tobytes()
            del hdr
            rc, err = self._spawn(kernel, fname)
            hdr = _File.from_buffer(mm)
            rep = hdr.report
            result = self._collect(kernel, seed, mm, arrays, places, outputs, rep, rc, err)
            del rep, hdr
            mm.close()
        finally:
            os.unlink(fname)
        SESSION_RUNS.add((str(self.path.resolve()), kernel))
        return result

    def _spawn(self, kernel: str, fname: str) -> tuple[int, str]:
        cmd = [str(self._built.runner), str(self._built.so), str(self._index[kernel]), fname]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise MetalRuntimeError(f"{kernel}: did not finish in {TIMEOUT_S:.0f} s "
                                    "(an endless loop, or a barrier some lanes never reach)") from None
        return p.returncode, p.stderr

    def _where(self, rep: _Report) -> str:
        return (f"lane thread_position_in_threadgroup={tuple(rep.lane_tid)} "
                f"threadgroup_position_in_grid={tuple(rep.lane_tg)}")

    def _collect(self, kernel, seed, mm, arrays, places, outputs, rep, rc, err):
        what = f"{self.path.name}:{kernel} (seed {seed})"
        if rep.error == 2:
            rw = "write" if rep.fault_write else "read"
            msg = _fault_message(rep, arrays, places)
            raise MetalRuntimeError(f"{what}: out-of-bounds {rw}: {msg}; {self._where(rep)}")
        if rep.error:
            raise MetalRuntimeError(f"{what}: {rep.msg.decode(errors='replace')}")
        if rc != 0:
            raise MetalRuntimeError(f"{what}: the runner failed (exit {rc}): {err[-2000:]}")
        result = []
        for i, (a, p) in enumerate(zip(arrays, places)):
            if p is None:
                result.append(None)
                continue
            start, region, data, n = p
            slack = np.frombuffer(mm, np.uint8, count=region, offset=start).copy()
            slack[data - start:data - start + n] = CANARY
            bad = np.flatnonzero(slack != CANARY)
            if bad.size:
                elem = (int(bad[0]) - (data - start)) // a.dtype.itemsize
                raise MetalRuntimeError(
                    f"{what}: out-of-bounds write to buffer {i} at element {elem} "
                    f"(it has {a.size} elements of {a.dtype})")
            out = np.frombuffer(mm, a.dtype, count=a.size, offset=data).reshape(a.shape).copy()
            result.append(out)
        return result


def _fault_message(rep: _Report, arrays, places) -> str:
    """Names the buffer and element of a fault from its offset in the launch file."""
    msg = rep.msg.decode(errors="replace")
    if "threadgroup memory" in msg:
        return msg
    off = rep.fault_addr - rep.file_base
    for i, (a, p) in enumerate(zip(arrays, places)):
        if p is None:
            continue
        start, region, data, n = p
        if start - PAGE <= off < start + region + PAGE:
            elem = (off - data) // a.dtype.itemsize if off >= data else -(-(data - off) // a.dtype.itemsize)
            return (f"buffer {i} (shape {a.shape}, {a.dtype}, {a.size} elements) at element {elem} "
                    f"({msg})")
    return f"{msg} at address 0x{rep.fault_addr:x}, outside every buffer"


_CACHE: dict[tuple, Library] = {}


def compile_metal(path, include_dirs: Iterable[str] = (), defines: Iterable[str] = ()) -> Library:
    """Compiles a .metal file for the emulator (cached by content); `defines` are
    preprocessor definitions ("NAME" or "NAME=value")."""
    path = Path(path).resolve()
    dirs = tuple(str(d) for d in include_dirs)
    built = _build.build(path, dirs, tuple(defines))
    key = (str(built.so),)
    if key not in _CACHE:
        _CACHE[key] = Library(path, built)
    return _CACHE[key]


def run_seeds(lib: Library, kernel: str, *, seeds=range(8), deterministic: bool = True,
              **run_kwargs) -> list[list[np.ndarray]]:
    """Runs `kernel` under several schedules (seeds). With deterministic=True, asserts the
    outputs are bit-identical across seeds (a difference means a race or uninitialised
    read) and names the first differing element. Returns the results of every seed."""
    results, seeds = [], list(seeds)
    for s in seeds:
        results.append(lib.run(kernel, seed=s, **run_kwargs))
    if deterministic:
        for i in run_kwargs.get("outputs", ()):
            ref = results[0][i]
            for s, r in zip(seeds[1:], results[1:]):
                a = ref.view(np.uint8).reshape(ref.shape + (-1,)) if ref.ndim else ref
                b = r[i].view(np.uint8).reshape(ref.shape + (-1,)) if ref.ndim else r[i]
                diff = np.argwhere(np.any(a != b, axis=-1)) if ref.ndim else ([] if a == b else [()])
                if len(diff):
                    idx = tuple(int(x) for x in diff[0])
                    raise MetalRuntimeError(
                        f"{lib.path.name}:{kernel}: output {i} differs between seed {seeds[0]} "
                        f"and seed {s} at element {idx}: {ref[idx]!r} vs {r[i][idx]!r} "
                        f"({len(diff)} elements differ): a race between simdgroups?")
    return results
