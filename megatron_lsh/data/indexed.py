"""Megatron's ``MMIDIDX`` indexed dataset: a streaming writer and a memory-mapped reader.

A dataset is a pair ``{prefix}.bin`` / ``{prefix}.idx``. The ``.bin`` holds every sequence's
tokens back to back in one dtype. The ``.idx`` (all little-endian) is, in order:

====================  =========================================================================
bytes                 content
====================  =========================================================================
9                     magic ``b"MMIDIDX\\x00\\x00"``
8  (<Q)               version, 1
1  (<B)               dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                      7 float32, 8 uint16
8  (<Q)               sequence count S
8  (<Q)               document-index count D (= documents + 1)
4 * S  (int32)        sequence lengths, in tokens
8 * S  (int64)        sequence pointers, the byte offset of each sequence in the ``.bin``
8 * D  (int64)        document indices: 0, then for each document the sequence index where
                      it ends (exclusive); document d is sequences [doc[d], doc[d+1])
====================  =========================================================================

This is byte-compatible with Megatron-LM's ``IndexedDataset`` in both directions.
The writer streams: tokens go straight to the ``.bin`` and the per-sequence lengths and
document boundaries are spilled to side files, so memory stays constant however large the
dataset. Everything is written under temporary names and renamed by :meth:`finalize`.
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_SPILL_BLOCK = 1 << 16  # sequences buffered in memory before spilling lengths to disk
_COPY_BLOCK = 1 << 20   # entries per chunk when streaming index arrays


def idx_path(prefix: str) -> str:
    """The index file of a dataset prefix."""
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    """The data file of a dataset prefix."""
    return prefix + ".bin"


def best_fitting_dtype(vocab_size: Optional[int]) -> np.dtype:
    """uint16 when every id fits (vocab below 65500, as Megatron decides), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def dataset_exists(prefix: str) -> bool:
    """True when both ``{prefix}.idx`` and ``{prefix}.bin`` exist."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in CODE_OF_DTYPE)
        raise DataError(f"dtype {dtype} cannot be stored in an MMIDIDX dataset (use one of {names})")
    return dtype


class _SpillBuffer:
    """A fixed-size numpy buffer that appends to a file whenever it fills (constant memory)."""

    def __init__(self, file, dtype, capacity: int) -> None:
        self.file = file
        self.buffer = np.empty(capacity, dtype=dtype)
        self.count = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.buffer.dtype).ravel()
        while values.size:
            take = min(values.size, self.buffer.size - self.count)
            self.buffer[self.count:self.count + take] = values[:take]
            self.count += take
            values = values[take:]
            if self.count == self.buffer.size:
                self.flush()

    def flush(self) -> None:
        if self.count:
            self.file.write(self.buffer[:self.count].tobytes())
            self.count = 0


class IndexedDatasetWriter:
    """Streams sequences into ``{prefix}.bin``/``.idx`` (Megatron's builder, constant memory).

    Usage: ``add_document(ids)`` (one sequence per document) or ``add_sequence`` several times
    then ``end_document()``; finally ``finalize()``. As a context manager it aborts (deletes
    its temporary files) when the block raises, and finalizes otherwise.
    """

    def __init__(self, prefix: str, dtype=np.uint16) -> None:
        self.prefix = prefix
        self.dtype = _check_dtype(dtype)
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise DataError(f"output folder {directory} does not exist")
        self._tmp = f".tmp-{os.getpid()}-{id(self):x}"
        self._bin_tmp = bin_path(prefix) + self._tmp
        self._idx_tmp = idx_path(prefix) + self._tmp
        self._lengths_tmp = prefix + ".lengths" + self._tmp
        self._docs_tmp = prefix + ".docs" + self._tmp
        self._bin = open(self._bin_tmp, "wb")
        self._lengths_file = open(self._lengths_tmp, "wb")
        self._docs_file = open(self._docs_tmp, "wb")
        self._file_dtype = self.dtype.newbyteorder("<")  # the files are little-endian everywhere
        self._lengths = _SpillBuffer(self._lengths_file, "<i4", _SPILL_BLOCK)
        self._docs = _SpillBuffer(self._docs_file, "<i8", _SPILL_BLOCK)
        self._docs.extend([0])
        self.num_sequences = 0
        self.num_document_indices = 1
        self.num_tokens = 0
        self._last_doc_end = 0
        self._closed = False
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._bounds = (int(info.min), int(info.max))
        else:
            self._bounds = None

    # --- adding data ----------------------------------------------------------------------

    def _as_checked_array(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"a sequence must be one-dimensional, got shape {arr.shape} for {self.prefix}")
        if arr.size and self._bounds is not None:
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"sequence {self.num_sequences} of {self.prefix} has non-integer "
                                f"values ({arr.dtype}) for the integer dtype {self.dtype}")
            low, high = int(arr.min()), int(arr.max())
            if low < self._bounds[0] or high > self._bounds[1]:
                bad = high if high > self._bounds[1] else low
                raise DataError(
                    f"token id {bad} in sequence {self.num_sequences} does not fit the dtype "
                    f"{self.dtype} of {self.prefix} (allowed {self._bounds[0]}..{self._bounds[1]})")
        return arr

    def _append(self, arr: np.ndarray, lengths: Sequence[int]) -> None:
        self._bin.write(arr.astype(self._file_dtype, copy=False).tobytes(order="C"))
        self._lengths.extend(lengths)
        self.num_sequences += len(lengths)
        self.num_tokens += int(arr.size)

    def add_sequence(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Append one sequence (checked to fit the dtype)."""
        arr = self._as_checked_array(tokens)
        self._append(arr, (arr.size,))

    def end_document(self) -> None:
        """Close the current document (the sequences added since the previous one)."""
        self._docs.extend([self.num_sequences])
        self.num_document_indices += 1
        self._last_doc_end = self.num_sequences

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document: ``tokens`` split into sequences of ``lengths`` (default: one)."""
        arr = self._as_checked_array(tokens)
        if lengths is None:
            lengths = (arr.size,)
        elif int(np.sum(lengths)) != arr.size or any(int(n) < 0 for n in lengths):
            raise DataError(f"sequence lengths {list(lengths)[:8]} do not partition the document's "
                            f"{arr.size} tokens ({self.prefix})")
        self._append(arr, lengths)
        self.end_document()

    def append_dataset(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix`` (same dtype), streaming."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"cannot merge {prefix} (dtype {other.dtype}) into {self.prefix} "
                            f"(dtype {self.dtype})")
        if self.num_sequences != self._last_doc_end:
            self.end_document()
        self._spill()
        with open(bin_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=4 << 20)
        offset = self.num_sequences
        for start in range(0, len(other.sequence_lengths), _COPY_BLOCK):
            block = np.asarray(other.sequence_lengths[start:start + _COPY_BLOCK], dtype="<i4")
            self._lengths_file.write(block.tobytes())
        for start in range(1, len(other.document_indices), _COPY_BLOCK):
            block = np.asarray(other.document_indices[start:start + _COPY_BLOCK], dtype=np.int64)
            self._docs.extend(block + offset)
        self.num_sequences += len(other)
        self.num_document_indices += len(other.document_indices) - 1
        self.num_tokens += int(other.num_tokens)
        self._last_doc_end = self.num_sequences
        other.close()

    # --- finishing ------------------------------------------------------------------------

    def _spill(self) -> None:
        self._lengths.flush()
        self._docs.flush()

    def finalize(self) -> None:
        """Write the ``.idx`` and move both files to their final names."""
        if self._closed:
            raise DataError(f"writer for {self.prefix} is already finalized or aborted")
        if self.num_sequences != self._last_doc_end:
            self.end_document()
        self._spill()
        for f in (self._bin, self._lengths_file, self._docs_file):
            f.close()
        try:
            with open(self._idx_tmp, "wb") as idx:
                idx.write(MAGIC)
                idx.write(struct.pack("<Q", VERSION))
                idx.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
                idx.write(struct.pack("<Q", self.num_sequences))
                idx.write(struct.pack("<Q", self.num_document_indices))
                with open(self._lengths_tmp, "rb") as src:
                    shutil.copyfileobj(src, idx, length=4 << 20)
                self._write_pointers(idx)
                with open(self._docs_tmp, "rb") as src:
                    shutil.copyfileobj(src, idx, length=4 << 20)
            os.replace(self._bin_tmp, bin_path(self.prefix))
            os.replace(self._idx_tmp, idx_path(self.prefix))
        except BaseException:
            self._remove_temporaries()
            self._closed = True
            raise
        self._remove_temporaries()
        self._closed = True

    def _write_pointers(self, out) -> None:
        """Byte offsets = exclusive running sum of lengths * itemsize, streamed in blocks."""
        itemsize = self.dtype.itemsize
        carry = 0
        with open(self._lengths_tmp, "rb") as src:
            while True:
                raw = src.read(_COPY_BLOCK * 4)
                if not raw:
                    break
                lengths = np.frombuffer(raw, dtype="<i4").astype(np.int64) * itemsize
                ends = np.cumsum(lengths) + carry
                out.write((ends - lengths).astype("<i8").tobytes())
                carry = int(ends[-1])

    def _remove_temporaries(self) -> None:
        for path in (self._bin_tmp, self._idx_tmp, self._lengths_tmp, self._docs_tmp):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def abort(self) -> None:
        """Discard everything written; no file is left behind."""
        if self._closed:
            return
        for f in (self._bin, self._lengths_file, self._docs_file):
            f.close()
        self._remove_temporaries()
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of ``{prefix}.bin``/``.idx``; validates both files on open.

    ``ds[i]`` is sequence i (a read-only numpy view), ``ds[i:j]`` a list of them,
    ``ds.get(i, offset, length)`` part of one. ``sequence_lengths``, ``sequence_pointers``
    and ``document_indices`` are the index arrays. Pickling reopens the files by prefix.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        prefix = self.prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        has_idx, has_bin = os.path.isfile(ipath), os.path.isfile(bpath)
        if not has_idx and not has_bin:
            raise DataError(f"dataset prefix {prefix} does not exist: neither {ipath} nor {bpath} found")
        if not has_idx:
            raise DataError(f"index file {ipath} is missing (its data file {bpath} exists)")
        if not has_bin:
            raise DataError(f"data file {bpath} is missing (its index file {ipath} exists)")
        idx_size = os.path.getsize(ipath)
        if idx_size < HEADER_SIZE:
            raise DataError(f"index file {ipath} is truncated: {idx_size} bytes, "
                            f"shorter than the {HEADER_SIZE}-byte header")
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[:len(MAGIC)]
        if magic != MAGIC:
            raise DataError(f"index file {ipath} is not an MMIDIDX index: it starts with "
                            f"{magic!r} instead of {MAGIC!r}")
        pos = len(MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != VERSION:
            raise DataError(f"index file {ipath} has version {version}; only version {VERSION} is supported")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPE_CODES:
            raise DataError(f"index file {ipath} has unknown dtype code {code} (known: 1-8)")
        num_sequences, num_doc_indices = struct.unpack_from("<QQ", header, pos + 9)
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_indices
        if idx_size < expected:
            raise DataError(f"index file {ipath} is truncated: its header announces {num_sequences} "
                            f"sequences and {num_doc_indices} document indices ({expected} bytes) "
                            f"but the file has {idx_size} bytes")
        if idx_size > expected:
            raise DataError(f"index file {ipath} has {idx_size - expected} bytes more than its header "
                            f"announces ({num_sequences} sequences, {num_doc_indices} document indices)")
        if num_doc_indices < 1:
            raise DataError(f"index file {ipath} is corrupt: it has no document indices (needs at least the leading 0)")
        self.dtype = DTYPE_CODES[code]
        self._file_dtype = self.dtype.newbyteorder("<")  # the files are little-endian everywhere
        self._idx_map = np.memmap(ipath, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx_map, "<i4", num_sequences, offset)
        offset += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(self._idx_map, "<i8", num_sequences, offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(self._idx_map, "<i8", num_doc_indices, offset)
        first, last = int(self.document_indices[0]), int(self.document_indices[-1])
        if first != 0 or last != num_sequences:
            raise DataError(f"index file {ipath} is corrupt: document indices must run from 0 to "
                            f"{num_sequences} (the sequence count), got {first}..{last}")
        if num_sequences:
            last_end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        else:
            last_end = 0
        bin_size = os.path.getsize(bpath)
        if bin_size != last_end:
            raise DataError(f"data file {bpath} has {bin_size} bytes but {ipath} describes "
                            f"{last_end} bytes ({last_end // self.dtype.itemsize} {self.dtype} tokens)")
        self._bin_map = (np.memmap(bpath, dtype=np.uint8, mode="r") if bin_size
                         else np.zeros(0, dtype=np.uint8))

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def close(self) -> None:
        """Drop the memory maps (the object is unusable afterwards)."""
        for name in ("sequence_lengths", "sequence_pointers", "document_indices", "_idx_map", "_bin_map"):
            self.__dict__.pop(name, None)

    # --- access ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents (one less than ``len(document_indices)``)."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens in the ``.bin``."""
        return int(self._bin_map.size // self.dtype.itemsize)

    @property
    def sizes(self) -> np.ndarray:
        """Alias of ``sequence_lengths`` (Megatron's legacy name)."""
        return self.sequence_lengths

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end by default)."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence index {idx} is out of range for {self.prefix} ({n} sequences)")
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {idx} "
                             f"of length {seq_len} in {self.prefix}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_map, dtype=self._file_dtype, count=length, offset=start)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise IndexError("slices of an IndexedDataset must be contiguous (step 1)")
            return [self.get(i) for i in range(start, stop)]
        return self.get(int(idx))

    def document(self, doc: int) -> List[np.ndarray]:
        """The sequences of document ``doc``."""
        lo, hi = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        return [self.get(i) for i in range(lo, hi)]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, "
                f"documents={self.num_documents}, dtype={self.dtype})")


def write_dataset(prefix: str, documents: Iterable, dtype=np.uint16) -> None:
    """Write ``documents`` (each a token list, or a list of sentence token lists) in one go."""
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            if len(doc) and isinstance(doc[0], (list, tuple, np.ndarray)):
                for sentence in doc:
                    writer.add_sequence(sentence)
                writer.end_document()
            else:
                writer.add_document(doc)


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexedDataset:
    """Concatenate the datasets at ``prefixes`` (same dtype) into ``output_prefix``."""
    if not prefixes:
        raise DataError("merge needs at least one input dataset")
    first = IndexedDataset(prefixes[0])
    dtype = first.dtype
    first.close()
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.append_dataset(prefix)
    return IndexedDataset(output_prefix)
