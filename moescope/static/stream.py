"""A layer's statistics computed in bounded memory, whatever the layer's size.

Cosines of flattened matrices, neuron-averaged vectors and the standardised Gram matrix behind matrix-level
PCA are all sums over rows, so they accumulate chunk by chunk (in float64) and never need a whole layer, or
even a whole member, in memory. Neuron-level work holds a few members at a time (``MemberCache``), and
neuron-level PCA accumulates its hidden x hidden covariance member by member.

On the CPU the matrix-level pass runs compiled kernels (``_stream_kernels``, numba) on all of torch's threads,
reading the readers' tensors in place (usually views of the mmap-ed checkpoint: no float32 or float64 copy of
a chunk, and no anonymous memory for it), while a read-ahead thread reads the next chunk and brings its pages
in from disk (``_populate``, ``_Files``), so that disk reads overlap the arithmetic instead of stalling it. On
a GPU, or where numba is missing or fails, torch computes the same sums in float64 blocks.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .pca import leading_eigen, sign_of_largest
from .similarity import neuron_vectors

RowReader = Callable[[int, int], torch.Tensor]   # (start, stop) -> rows [stop-start, cols] of one member


@dataclass
class StreamedLayer:
    """Matrix-level similarity, neuron-averaged similarity and matrix-level PCA of same-shape members."""

    matrix_similarity: torch.Tensor       # [N, N] float64
    averaged_similarity: torch.Tensor     # [N, N] float64
    pca_coords: torch.Tensor | None       # [N, k] float64 (None with fewer than 2 members)
    pca_evr: torch.Tensor | None          # [k]


def chunk_rows(total: int, row_bytes: int, budget_bytes: int, align: int = 128) -> list[tuple[int, int]]:
    """Split ``total`` rows into chunks of at most ``budget_bytes`` (a multiple of ``align`` rows when possible)."""
    rows = max(1, budget_bytes // max(row_bytes, 1))
    if rows >= align:
        rows -= rows % align
    return [(s, min(s + rows, total)) for s in range(0, total, rows)]


def stream_layer(readers: Sequence[RowReader], rows: int, cols: int, neuron_axis: int, *, k: int = 3,
                 budget_bytes: int = 2 << 30, device: str | torch.device = "cpu") -> StreamedLayer:
    """Stream ``rows`` x ``cols`` canonical matrices of N same-shape members through the accumulators.

    ``neuron_axis`` is 0 for gate/up ([I, H]: average over rows) and 1 for down ([H, I]: average over columns).
    Matrix-level PCA needs a second pass over the rows, for its sign rule (each component's entry of largest
    magnitude is made positive), once the components are known.

    Memory: the budget covers two chunks of all members (one being read while the other is used). The compiled
    CPU path counts 8 bytes per element of a chunk (a stored value and its float32 conversion, or a float64
    value) although views of an mmap-ed checkpoint take none of it, and otherwise needs only small per-thread
    scratch (a few N x 256 float64 arrays); it reads chunks of about ``CHUNK_BYTES`` (at least 128 rows) when
    the budget allows. The torch path holds two float32 chunks and float64 blocks of them.
    """
    kern = _kernels() if torch.device(device).type == "cpu" else None
    if kern is not None:
        try:
            return _stream_layer_compiled(kern, readers, rows, cols, neuron_axis, k=k, budget_bytes=budget_bytes)
        except Exception as exc:  # noqa: BLE001 - a numba failure (compiling or loading): use torch from now on
            if not _from_numba(exc):
                raise
            _disable_kernels(exc)
    return _stream_layer_torch(readers, rows, cols, neuron_axis, k=k, budget_bytes=budget_bytes, device=device)


def pass_memory(members: int, rows: int, cols: int, budget_bytes: int, device: str | torch.device = "cpu") -> int:
    """Bytes ``stream_layer`` holds at most for ``members`` matrices of ``rows`` x ``cols``: its chunks as the
    budget counts them (an upper bound: views of an mmap-ed checkpoint take no anonymous memory) plus its
    accumulators (Gram matrices per thread, neuron-averaged sums)."""
    if torch.device(device).type == "cpu":
        most = max(b - a for a, b in _compiled_chunks(rows, members, cols, budget_bytes))
        chunks = 2 * _ELEMENT_BYTES * members * most * cols
        accumulators = 2 * max(1, torch.get_num_threads()) * (members + 4) ** 2 * 8  # padded to the kernels' tile
    else:
        most = max(b - a for a, b in chunk_rows(rows, (8 * members + 4) * cols, budget_bytes * 7 // 8))
        chunks = most * (8 * members + 4) * cols + 3 * members * min(_BLOCK, most * cols) * 8
        accumulators = 2 * members * members * 8
    return chunks + accumulators + members * (rows + cols) * 8


def warm_up() -> bool:
    """Load the compiled kernels now; True when they are in use.

    Importing numba and loading the kernels from numba's cache takes about a second once per process (the
    first run after installing or editing them compiles them, for half a minute or so, and caches them).
    """
    kern = _kernels()
    if kern is None:
        return False
    try:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):  # one compiled version per stored dtype
            readers = [lambda a, b, v=float(i), d=dtype: torch.full((b - a, 3), v, dtype=d) for i in range(2)]
            _stream_layer_compiled(kern, readers, 2, 3, 0, k=1, budget_bytes=1 << 20)
    except Exception as exc:  # noqa: BLE001 - as in stream_layer
        if not _from_numba(exc):
            raise
        _disable_kernels(exc)
        return False
    return True


# -- compiled (numba) path -------------------------------------------------------------------------------------

USE_KERNELS = True     # False: always the torch path (tests compare the two)
CHUNK_BYTES = 8 << 20  # target size of a chunk of all members as bf16: large enough for few reads per matrix,
                       # small enough that reading the first chunk (not overlapped with work) is short
_ELEMENT_BYTES = 8     # budget per element of a chunk (see stream_layer)
_kernels_module = None
_kernels_error: str | None = None


def _kernels():
    """The numba kernels, imported once; None when numba is missing or broken, or the kernels are disabled."""
    global _kernels_module, _kernels_error
    if not USE_KERNELS or _kernels_error is not None:
        return None
    if _kernels_module is None:
        try:
            from . import _stream_kernels
        except Exception as exc:  # noqa: BLE001 - numba missing or broken (any import error): use torch
            _kernels_error = f"{type(exc).__name__}: {exc}"
            return None
        _kernels_module = _stream_kernels
    return _kernels_module


def _from_numba(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("numba", "llvmlite")


def _disable_kernels(exc: BaseException) -> None:
    global _kernels_error
    _kernels_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"moescope: the compiled kernels of the matrix-level pass failed ({_kernels_error}); "
                  "using torch instead (same numbers, slower)", stacklevel=3)


def _compiled_chunks(total: int, members: int, cols: int, budget_bytes: int) -> list[tuple[int, int]]:
    """Row chunks of about ``CHUNK_BYTES`` (as bf16), at least 128 rows (fp8 block-quantised rows are read in
    128s), fewer when two chunks at ``_ELEMENT_BYTES`` per element would exceed 7/8 of the budget."""
    most = max(1, budget_bytes * 7 // 8 // (2 * _ELEMENT_BYTES * members * cols))
    want = max(128, CHUNK_BYTES // (2 * members * cols))
    return chunk_rows(total, 1, min(want, most))


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(role: str, workers: int) -> ThreadPoolExecutor:
    """A thread pool kept for the process (starting threads for every matrix costs more than small matrices)."""
    with _POOLS_LOCK:
        pool = _POOLS.get((role, workers))
        if pool is None:
            pool = _POOLS[(role, workers)] = ThreadPoolExecutor(workers, thread_name_prefix=f"moescope-{role}")
        return pool


def _forget_pools() -> None:  # a forked child has none of its parent's threads
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _run(pool: ThreadPoolExecutor, calls: list[tuple]) -> None:
    """Run kernel calls (function, *args) at once: the first on this thread, the others on the pool."""
    futures = [pool.submit(*call) for call in calls[1:]]
    try:
        calls[0][0](*calls[0][1:])
    finally:
        for future in futures:
            future.result()


def _spans(total: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``total`` split into at most ``parts`` contiguous (start, stop) ranges, cut at multiples of ``multiple``."""
    units = -(-total // multiple)
    parts = max(1, min(parts, units))
    cuts = [min(total, (units * i // parts) * multiple) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _madvise():
    """libc's madvise where there is one (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise
    except (OSError, AttributeError):
        return None


_MADVISE = _madvise()
_PAGE = mmap.PAGESIZE
_WILLNEED, _POPULATE_READ = 3, 22  # MADV_POPULATE_READ: Linux 5.14+ (older kernels: EINVAL, ignored)
_AHEAD = 2  # chunks read ahead of the next one, per member


def _populate(tensors: list[torch.Tensor], files=None) -> None:
    """Bring the tensors' pages into memory now: they are often views of the mmap-ed checkpoint, read from disk
    when first touched.

    Runs on the read-ahead thread, so that the disk reads overlap the kernels' work on the previous chunk
    instead of happening as page faults inside the kernels: asynchronous read-ahead of every member's range and
    of the next ``_AHEAD`` such ranges of its storage (its next chunks), then a blocking populate of the
    ranges. Advisory: errors are ignored.
    """
    if _MADVISE is None:
        return
    ranges, ahead = [], []
    for t in tensors:
        start, stop = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        ranges.append((start // _PAGE * _PAGE, stop))
        storage = t.untyped_storage()
        end = min(storage.data_ptr() + storage.nbytes(), stop + _AHEAD * (stop - start))
        if end > stop:
            ahead.append((stop // _PAGE * _PAGE, end))
    for start, stop in ranges + ahead:
        _MADVISE(start, stop - start, _WILLNEED)
    if files is not None:
        files.read_ahead(ranges)
    for start, stop in ranges:
        _MADVISE(start, stop - start, _POPULATE_READ)


_NORMAL, _RANDOM = 0, 1
_FILE_LOOKAHEAD = 256 << 20  # bytes of a checkpoint file read ahead of the chunks


class _Files:
    """The mmap-ed checkpoint files one pass reads from (its readers' views), and how they are read.

    A view of an mmap-ed file is read from disk when first touched, often by the reader itself, which holds
    the GIL meanwhile; with the kernel's default read-around every first touch reads ``read_ahead_kb`` around
    it synchronously, one member after the other. So while a chunk's readers run, the files are
    ``MADV_RANDOM`` (a touch reads a single page); then all members' ranges are read at once (``_populate``),
    and each file ahead of the chunk, ``_FILE_LOOKAHEAD`` bytes (the members' next chunks, the layer's other
    matrices) asynchronously; the files get their normal read-ahead back after every chunk's readers.
    Advisory only: nothing here changes what is read, only when.
    """

    def __init__(self):
        self.ends: dict[int, int] = {}                # file mapping start -> end
        self.advised: dict[int, tuple[int, int]] = {}  # file mapping start -> [lo, hi) read ahead

    def random(self) -> None:
        """Before a chunk's readers run: known files fault single pages."""
        for start, end in self.ends.items():
            _MADVISE(start, end - start, _RANDOM)

    def see(self, t: torch.Tensor) -> None:
        """After a reader returned ``t``: its file, if new, faults single pages too."""
        address = t.data_ptr()
        if any(start <= address < end for start, end in self.ends.items()):
            return
        found = _file_mapping(address)
        if found is not None:
            self.ends[found[0]] = found[1]
            _MADVISE(found[0], found[1] - found[0], _RANDOM)

    def normal(self) -> None:
        """After a chunk's readers ran: the files' normal read-ahead is back."""
        for start, end in self.ends.items():
            _MADVISE(start, end - start, _NORMAL)

    def read_ahead(self, ranges: list[tuple[int, int]]) -> None:
        """Read each file ahead of the chunk's ranges, asynchronously (only what was not advised yet)."""
        for start, end in self.ends.items():
            inside = [a for a, _ in ranges if start <= a < end]
            if not inside:
                continue
            first = min(inside)
            lo, hi = self.advised.get(start, (first, first))
            want = min(end, first + _FILE_LOOKAHEAD)
            if lo <= first and want <= hi + _FILE_LOOKAHEAD // 4:
                continue
            for a, b in ((first, min(lo, want)), (max(hi, first), want)):
                if b > a:
                    a = a // _PAGE * _PAGE
                    _MADVISE(a, b - a, _WILLNEED)
            self.advised[start] = (min(lo, first), max(hi, want))


def _file_mapping(address: int) -> tuple[int, int] | None:
    """(start, end) of the file-backed memory mapping that holds ``address``, or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(v, 16) for v in fields[0].split("-"))
                if start <= address < end:
                    file = len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/")
                    return (start, end) if file else None
    except (OSError, ValueError):
        pass
    return None


_NATIVE = {torch.bfloat16: np.uint16, torch.float32: np.float32, torch.float64: np.float64}


@dataclass
class _Chunk:
    """One chunk of the members' rows, as the kernels read it."""

    like: np.ndarray             # an empty array of the dtype read: bf16 bits (uint16), float32 or float64
    tensors: list[torch.Tensor]  # kept alive while the kernels read them
    addrs: np.ndarray            # [N] int64 data addresses


def _prepare(tensors: list[torch.Tensor], populate: bool, files=None) -> _Chunk:
    """The members' rows in one dtype the kernels read, contiguous on the CPU (fp16 or mixed dtypes: converted
    to float32, or float64 when a member is float64), their pages brought in."""
    tensors = [t.detach().cpu() for t in tensors]
    dtypes = {t.dtype for t in tensors}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtype not in _NATIVE:
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        tensors = [t.to(dtype) for t in tensors]
    tensors = [t.contiguous() for t in tensors]
    if populate:
        _populate(tensors, files)
    return _Chunk(np.empty(0, _NATIVE[dtype]), tensors, np.array([t.data_ptr() for t in tensors], dtype=np.int64))


def _prepared_chunks(readers: Sequence[RowReader], chunks: list[tuple[int, int]], cols: int,
                     populate: bool = True) -> Iterator[tuple[int, int, _Chunk]]:
    """Yield (start, stop, chunk); the next chunk is read (and its pages brought in) on a thread meanwhile."""

    files = _Files() if populate and _MADVISE is not None else None

    def read(index: int) -> _Chunk:
        start, stop = chunks[index]
        parts = []
        if files is not None:
            files.random()
        try:
            for reader in readers:
                part = reader(start, stop)
                if tuple(part.shape) != (stop - start, cols):
                    raise ValueError(f"a member's rows {start}:{stop} have shape {tuple(part.shape)}, expected "
                                     f"{(stop - start, cols)}")
                parts.append(part)
                if files is not None:
                    files.see(part)
        finally:
            if files is not None:
                files.normal()
        return _prepare(parts, populate, files)

    reading = _pool("read", 1)
    pending = reading.submit(read, 0)
    try:
        for index, (start, stop) in enumerate(chunks):
            chunk = pending.result()
            if index + 1 < len(chunks):
                pending = reading.submit(read, index + 1)
            yield start, stop, chunk
    finally:  # a read-ahead left behind (an error, or a pass stopped early) must not outlive the pass
        if not pending.cancel():
            pending.exception()


def _stream_layer_compiled(kern, readers: Sequence[RowReader], rows: int, cols: int, neuron_axis: int, *,
                           k: int, budget_bytes: int) -> StreamedLayer:
    """``stream_layer`` with the compiled kernels: a pass for the sums, a pass for the sign rule."""
    n, m = len(readers), kern.padded(len(readers))
    threads = max(1, torch.get_num_threads())
    pool = _pool("compute", threads)
    chunks = _compiled_chunks(rows, n, cols, budget_bytes)
    # threads take row ranges of each chunk, each with its own sums (column sums too: summed in order at the end)
    gram, zgram = np.zeros((threads, m, m)), np.zeros((threads, m, m))
    avg_cols = np.zeros((threads, n, cols) if neuron_axis == 0 else (threads, n, 0))
    avg_rows = np.zeros((n, rows) if neuron_axis != 0 else (n, 0))
    for start, stop, chunk in _prepared_chunks(readers, chunks, cols):
        _run(pool, [(kern.accumulate, chunk.addrs, chunk.like, cols, r0, r1, 0, cols, neuron_axis, gram[i], zgram[i],
                     avg_cols[i], avg_rows, start) for i, (r0, r1) in enumerate(_spans(stop - start, threads))])
    averaged = avg_cols.sum(0) / rows if neuron_axis == 0 else avg_rows / cols
    similarity = _cosine(_symmetric(gram.sum(0)[:n, :n]))
    averaged_similarity = _cosine(torch.from_numpy(kern.row_gram(averaged)))
    if n < 2:
        return StreamedLayer(similarity, averaged_similarity, None, None)
    evals, evecs, total = _leading_eigen(_symmetric(zgram.sum(0)[:n, :n]).numpy(), min(k, n - 1))
    u = np.zeros((m, -(-evecs.shape[1] // 3) * 3))  # the kernel projects on 3 components at a time
    u[:n, : evecs.shape[1]] = evecs
    best, sign = np.full(u.shape[1], -1.0), np.ones(u.shape[1])
    # the sign rule's pass; the first pass brought the pages in (and mapped them), so no populate
    for start, stop, chunk in _prepared_chunks(readers, chunks, cols, populate=False):
        spans = _spans(stop - start, threads)
        part_best, part_sign = np.full((len(spans), u.shape[1]), -1.0), np.ones((len(spans), u.shape[1]))
        _run(pool, [(kern.largest_entries, chunk.addrs, chunk.like, cols, r0, r1, u, part_best[i], part_sign[i])
                    for i, (r0, r1) in enumerate(spans)])
        for i in range(len(spans)):  # rows in order: a later entry wins only when strictly larger
            better = part_best[i] > best
            best, sign = np.where(better, part_best[i], best), np.where(better, part_sign[i], sign)
    coords = torch.from_numpy(evecs * np.sqrt(evals) * sign[: evecs.shape[1]])
    evr = torch.from_numpy(evals / total if total > 0 else evals * float("nan"))
    return StreamedLayer(similarity, averaged_similarity, coords, evr)


def _leading_eigen(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``pca.leading_eigen`` in numpy, whose LAPACK wakes no thread pool for an N x N matrix (torch's would
    keep spinning for a while, competing with the kernels for the cores)."""
    evals, evecs = np.linalg.eigh(gram)
    return evals[::-1][:k].clip(min=0), np.ascontiguousarray(evecs[:, ::-1][:, :k]), float(np.trace(gram))


def _symmetric(upper: np.ndarray) -> torch.Tensor:
    """The symmetric float64 tensor whose upper triangle (diagonal included) is ``upper``'s."""
    return torch.from_numpy(np.ascontiguousarray(np.triu(upper) + np.triu(upper, 1).T))


# -- torch path (GPU, or numba unavailable) --------------------------------------------------------------------

def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / norms[:, None] / norms[None, :]


def _inverse_variance(block: torch.Tensor) -> torch.Tensor:
    """1 / (Bessel variance over the N members) of each column of ``block`` [N, D]; 0 for constant columns.

    The standardised Gram is then ``C (X diag(w) X^T) C`` (C centres over members), and a component
    ``Z^T u = diag(sqrt(w)) X^T u`` for eigenvectors u orthogonal to the ones vector: no standardised copy.
    Column sums are products with a ones vector (BLAS), not strided reductions.
    """
    n = block.shape[0]
    ones = block.new_ones(1, n)
    total, squares = (ones @ block)[0], (ones @ block.square())[0]
    var = (squares - total.square() / n) / (n - 1)
    constant = var <= 1e-12 * squares / n  # equal entries up to rounding
    return torch.where(constant, 0.0, 1.0 / var.clamp_min(1e-300))


_BLOCK = 1 << 15  # columns of a chunk converted to float64 at a time (N x 256 KiB: stays in cache)


def _float64_blocks(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, flat.shape[1], _BLOCK):
        yield flat[:, start:start + _BLOCK].double()


def _read_chunks(readers: Sequence[RowReader], chunks: list[tuple[int, int]], cols: int,
                 buffers: list[torch.Tensor]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, members' rows as float32 [N, rows*cols]); the next chunk is read while one is used."""

    def read(index: int) -> torch.Tensor:
        start, stop = chunks[index]
        out = buffers[index % 2][:, : (stop - start) * cols]
        for member, reader in enumerate(readers):
            out[member].copy_(reader(start, stop).reshape(-1))
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0)
        for index, (start, stop) in enumerate(chunks):
            flat = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(read, index + 1)
            yield start, stop, flat


def _stream_layer_torch(readers: Sequence[RowReader], rows: int, cols: int, neuron_axis: int, *, k: int = 3,
                        budget_bytes: int = 2 << 30, device: str | torch.device = "cpu") -> StreamedLayer:
    """The torch path: two float32 chunks of all members and one member's rows as stored fill the budget."""
    n = len(readers)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    zgram = torch.zeros_like(gram)
    averaged = torch.zeros(n, cols if neuron_axis == 0 else rows, dtype=torch.float64, device=device)
    chunks = chunk_rows(rows, (8 * n + 4) * cols, budget_bytes * 7 // 8)  # 1/8 left for small temporaries
    most = max(stop - start for start, stop in chunks)
    buffers = [torch.empty(n, most * cols, dtype=torch.float32, device=device) for _ in range(2)]
    for start, stop, flat in _read_chunks(readers, chunks, cols, buffers):
        x = flat.view(n, stop - start, cols)
        # float32 sums (torch sums pairwise: no float64 copy of the chunk), accumulated in float64 across chunks
        if neuron_axis == 0:
            averaged += x.sum(1).double()
        else:
            averaged[:, start:stop] = x.sum(2).double() / cols
        for block in _float64_blocks(flat):
            gram += block @ block.T
            if n >= 2:
                zgram += (block * _inverse_variance(block)) @ block.T
    if neuron_axis == 0:
        averaged /= rows
    centre = torch.eye(n, dtype=torch.float64, device=device) - 1.0 / n
    zgram = centre @ zgram @ centre
    pca = _pca_from_gram(zgram, readers, chunks, cols, buffers, k) if n >= 2 else (None, None)
    return StreamedLayer(_cosine(gram), _cosine(averaged @ averaged.T), *pca)


def _pca_from_gram(zgram: torch.Tensor, readers: Sequence[RowReader], chunks, cols: int,
                   buffers: list[torch.Tensor], k: int):
    """PCA scores from the standardised Gram Z Z^T; a second pass finds each component's largest entry for its sign."""
    evals, evecs, total = leading_eigen(zgram, min(k, zgram.shape[0] - 1))
    best = torch.full((evals.numel(),), -1.0, dtype=torch.float64, device=zgram.device)
    sign = torch.ones_like(best)
    for _, _, flat in _read_chunks(readers, chunks, cols, buffers):
        for block in _float64_blocks(flat):  # component j is proportional to Z^T u_j = Y^T u_j (u ⟂ ones)
            v = (evecs.T @ block) * _inverse_variance(block).sqrt()      # [k, D]
            idx = v.abs().argmax(1)
            top = v.gather(1, idx[:, None])[:, 0]
            better = top.abs() > best
            best = torch.where(better, top.abs(), best)
            sign = torch.where(better, torch.where(top < 0, -1.0, 1.0).double(), sign)
    coords = evecs * evals.sqrt() * sign
    return coords, evals / total if total > 0 else evals * float("nan")


class MemberCache:
    """Members loaded on demand and kept while they fit in ``budget_bytes`` (least recently used leave first)."""

    def __init__(self, load: Callable[[int], torch.Tensor], budget_bytes: int):
        self.load, self.budget = load, budget_bytes
        self._kept: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        member = self._kept.pop(index, None)
        if member is None:
            member = self.load(index)
        self._kept[index] = member  # most recent last
        while len(self._kept) > 2 and sum(t.numel() * t.element_size() for t in self._kept.values()) > self.budget:
            self._kept.pop(next(iter(self._kept)))
        return member


def streamed_neuron_pca(members: Callable[[int], torch.Tensor], count: int, matrix: str, k: int = 3):
    """Neuron-level PCA (one point per neuron, member-major) reading one member at a time.

    Column statistics and ``Z^T Z`` (hidden x hidden) accumulate in float64 over members; the components are its
    leading eigenvectors (entry of largest magnitude made positive) and a second pass projects every neuron.
    Returns (coords [sum I, k], explained variance ratio [k]).
    """
    total = cross = points = 0
    for i in range(count):
        v = neuron_vectors(members(i), matrix).double()
        total, cross, points = total + v.sum(0), cross + v.T @ v, points + v.shape[0]
    mean = total / points
    cov = (cross - points * torch.outer(mean, mean)) / (points - 1)
    var = cov.diagonal()
    constant = var <= 1e-12 * (cross.diagonal() / points)
    inv_std = torch.where(constant, 0.0, var.clamp_min(1e-300).rsqrt())
    ztz = cov * torch.outer(inv_std, inv_std) * (points - 1)
    evals, evecs, trace = leading_eigen(ztz, k)
    evecs = evecs * sign_of_largest(evecs)
    coords = torch.cat([((neuron_vectors(members(i), matrix).double() - mean) * inv_std) @ evecs
                        for i in range(count)])
    return coords, evals / trace
