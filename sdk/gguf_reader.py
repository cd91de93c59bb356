"""Read what detox needs from a GGUF file — metadata, vocabulary, the output matrix in row chunks — without loading it.

Why not ``gguf.GGUFReader``: it builds one numpy view per array element (a 262k-token vocabulary is ~1M views,
seconds and hundreds of MB) and fails on a damaged file with ``IndexError`` / "cannot reshape". This parser reads
the header with ``struct`` (strings decoded the way the old reader path did), bounds-checks every length against
the file before using it, and raises :class:`GGUFError` — one line naming the file and the problem — for anything
truncated or malformed. Tensor data is read with plain file reads (not a memory map), so touching a 2 GB output
matrix never puts 2 GB of file pages into the process's resident set. De-quantization is ``gguf.quants.dequantize``
on row chunks: blocks never span rows, and it is element-wise, so chunks give exactly the values of the whole tensor.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

GGUF_MAGIC = b"GGUF"
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens such as <|im_start|>
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays: deeper is malformed (and would otherwise recurse without bound)
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


class GGUFError(ValueError):
    """A GGUF file that cannot be read (truncated, damaged, or missing what detox needs)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (row) dimension
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.n_bytes // self.rows


@dataclass
class GGUFFile:
    """The parsed header of a GGUF file: metadata (``fields``) and tensor layout; tensor data stays on disk."""

    path: Path
    fields: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def tokens(self) -> list[str]:
        """The id-ordered vocabulary (``tokenizer.ggml.tokens``)."""
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise GGUFError(f"{self.path}: has no tokenizer.ggml.tokens string array; cannot read its vocabulary")
        return tokens

    def control_tokens(self) -> set[str]:
        """Tokens typed CONTROL in ``tokenizer.ggml.token_type`` (the tokenizer's special tokens)."""
        tokens, types = self.tokens(), self.fields.get("tokenizer.ggml.token_type")
        if not isinstance(types, np.ndarray) or len(types) != len(tokens):
            return set()
        return {t for t, k in zip(tokens, types.tolist()) if k == TOKEN_TYPE_CONTROL}

    def output_tensor(self) -> GGUFTensor:
        """``output.weight``, or ``token_embd.weight`` for a model whose output embedding is tied to its input."""
        t = self.tensors.get("output.weight") or self.tensors.get("token_embd.weight")
        if t is None:
            raise GGUFError(f"{self.path}: has neither output.weight nor token_embd.weight; cannot read its output matrix")
        if len(t.shape) != 2:
            raise GGUFError(f"{self.path}: {t.name} has shape {list(t.shape)}; an output matrix has two dimensions")
        return t

    def output_shape(self) -> tuple[int, int]:
        """``(vocab, hidden)`` of the output matrix."""
        t = self.output_tensor()
        return t.shape[1], t.shape[0]

    def output_rows(self, chunk_elements: int = 1 << 22, threads: int = 2) -> Iterator[np.ndarray]:
        """The output matrix de-quantized to float32, in consecutive row chunks of about ``chunk_elements`` values.

        ``threads`` chunks are read and de-quantized ahead in worker threads (numpy releases the GIL), so the
        consumer's work on one chunk (hashing) overlaps theirs; at most ``threads + 2`` chunks exist at once.
        """
        t = self.output_tensor()
        step = max(1, chunk_elements // t.shape[0])
        with ThreadPoolExecutor(max(1, threads)) as pool:
            pending: deque[Future[np.ndarray]] = deque()
            for start in range(0, t.rows, step):
                pending.append(pool.submit(self._rows, t, start, min(step, t.rows - start)))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _rows(self, t: GGUFTensor, start: int, n: int) -> np.ndarray:
        from gguf.quants import dequantize

        buf = np.empty(n * t.row_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset + start * t.row_bytes)
            if f.readinto(memoryview(buf)) != buf.nbytes:  # the file shrank since its header was read
                raise GGUFError(f"{self.path}: ends inside {t.name}; the file is truncated (re-download it)")
        try:
            rows = dequantize(buf.reshape(n, t.row_bytes), t.ggml_type)
        except NotImplementedError as err:
            raise GGUFError(f"{self.path}: {t.name} is stored as {_type_name(t.ggml_type)}, which the gguf package "
                            f"cannot de-quantize ({err}); upgrade gguf") from err
        return np.asarray(rows, dtype=np.float32).reshape(n, t.shape[0])

    def output_matrix(self) -> np.ndarray:
        """The whole output matrix, float32 ``[vocab, hidden]`` (filled chunk by chunk: one copy in memory)."""
        out = np.empty(self.output_shape(), dtype=np.float32)
        i = 0
        for rows in self.output_rows():
            out[i : i + len(rows)] = rows
            i += len(rows)
        return out


def _type_name(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes; every overrun is a GGUFError naming the offset."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem} (at byte {self.pos} of {self.size}); the file is truncated or "
                         "is not a GGUF model (re-download or re-convert it)")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"ends inside {what}")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        return bytes(self.buf[start : start + n]).decode("utf-8", "surrogateescape")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype != _ARRAY or depth >= _MAX_NESTING:
            raise self.fail(f"{what} has an unknown value type {vtype}")
        itype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if itype in _NUMPY:
            dtype = np.dtype(_NUMPY[itype])
            start = self.take(count * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
            return arr.astype(bool) if itype == 7 else arr
        if count > self.size - self.pos:  # every element takes at least one byte: refuse absurd counts up front
            raise self.fail(f"ends inside {what} ({count} elements declared)")
        if itype == _STRING:
            return self.strings(count, what)
        return [self.value(itype, what, depth + 1) for _ in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings: the vocabulary's hot loop (262k tokens for Gemma 3), so inlined."""
        buf, pos, size, unpack, out = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            n = unpack(buf, pos)[0] if pos + 8 <= size else size  # no room for the length: treated as too long
            if n > size - pos - 8:
                self.pos = pos
                raise self.fail(f"ends inside {what}")
            out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", "surrogateescape"))
            pos += 8 + n
        self.pos = pos
        return out


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the header of the GGUF file ``path`` and check that every tensor lies inside the file.

    Reads only the header (the vocabulary included); raises :class:`GGUFError` for a missing, truncated or
    malformed file and for big-endian files (not supported).
    """
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file not found: {p}")
    size = p.stat().st_size
    if size < 24:
        raise GGUFError(f"{p}: only {size} bytes; a GGUF file starts with a 24-byte header (truncated file?)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            raise GGUFError(f"{p}: does not start with the GGUF magic bytes; not a GGUF file (or a big-endian one)")
        c = _Cursor(mm, p)
        c.take(4, "the magic")
        version = c.scalar("<I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"{p}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = c.scalar("<Q", "the tensor count"), c.scalar("<Q", "the metadata count")
        if n_tensors > size or n_fields > size:
            raise c.fail(f"declares {n_tensors} tensors and {n_fields} metadata entries in {size} bytes")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = c.string("a metadata key")
            fields[key] = c.value(c.scalar("<I", f"metadata {key!r}"), f"metadata {key!r}")
        infos = []
        for _ in range(n_tensors):
            name = c.string("a tensor name")
            n_dims = c.scalar("<I", f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(c.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims))
            infos.append((name, shape, c.scalar("<I", f"tensor {name!r}"), c.scalar("<Q", f"tensor {name!r}")))
        data_start = c.pos
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{p}: general.alignment is {alignment!r}; it must be a power of two")
    data_start += -data_start % alignment
    return GGUFFile(p, fields, _tensors(p, infos, data_start, size))


def _tensors(p: Path, infos: list[tuple[str, tuple[int, ...], int, int]], data_start: int, size: int) -> dict[str, GGUFTensor]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, ggml_type, rel in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"{p}: tensor {name!r} has an unknown type {ggml_type}; the file is damaged, or newer "
                            "than the installed gguf package (upgrade gguf)") from None
        n = int(np.prod(shape, dtype=object))
        if any(d < 1 for d in shape) or shape[0] % block:
            raise GGUFError(f"{p}: tensor {name!r} has an impossible shape {list(shape)} for {_type_name(ggml_type)}")
        n_bytes = n // block * type_size
        offset = data_start + rel
        if offset + n_bytes > size:
            raise GGUFError(f"{p}: tensor {name!r} needs bytes {offset}..{offset + n_bytes} but the file has {size}; "
                            "the file is truncated (re-download it)")
        if name in tensors:
            raise GGUFError(f"{p}: tensor {name!r} appears twice; the file is damaged")
        tensors[name] = GGUFTensor(name, shape, ggml_type, offset, n_bytes)
    return tensors
