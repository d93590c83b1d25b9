"""Streaming JSONL -> ``.bin``/``.idx`` preprocessing (the engine of ``tools/preprocess_data.py``).

Pipeline, per partition of the input (contiguous byte ranges cut at line starts):

1. the main process reads lines in batches (up to 256 lines or 1 MB);
2. worker processes parse JSON, split sentences (optional), tokenize, and return numpy arrays;
3. the main process writes each result as soon as it is the next in input order.

Memory does not grow with the corpus: at most ``4 * workers`` batches are in flight
(``Pool.imap`` would read the whole input ahead, so batches are submitted with
``apply_async`` under that bound), the writer streams tokens to disk and spills its index
arrays. With ``workers == 1`` the main process tokenizes itself (no inter-process copies).
With ``partitions > 1`` each partition runs in its own process with ``workers // partitions``
workers, writes a temporary dataset, and the parts are merged in input order at the end.
All outputs are written under temporary names and renamed only when everything succeeded.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .indexed import IndexedDatasetWriter, best_fitting_dtype, merge_datasets

BATCH_LINES = 256
BATCH_BYTES = 1 << 20
MAX_WARNINGS = 10

# A sentence ends after . ! or ? (plus closing quotes/brackets) when more text follows; a
# paragraph (blank line) also ends one. Whitespace stays at the start of the next sentence,
# so the sentences of a text concatenate back to exactly the text.
_SENTENCE_END = re.compile(r"""[.!?]+["')\]]*(?=\s+\S)|(?<=\S)(?=[ \t]*\n[ \t]*\n\s*\S)""")


def split_sentences(text: str) -> List[str]:
    """Cut ``text`` into sentences; ``"".join(split_sentences(t)) == t``."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if end > start:
            pieces.append(text[start:end])
            start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (see ``tools/preprocess_data.py --help``)."""

    input: str
    output_prefix: str
    tokenizer: Dict[str, Any]
    """Keyword arguments of :func:`megatron_lsh.tokenizer.build_tokenizer` (``tokenizer_type``...)."""
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    split_sentences: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False

    def __post_init__(self):
        if self.workers < 1:
            raise DataError(f"workers must be at least 1, got {self.workers}")
        if self.partitions < 1:
            raise DataError(f"partitions must be at least 1, got {self.partitions}")
        if self.log_interval < 1:
            raise DataError(f"log_interval must be at least 1, got {self.log_interval}")
        if not self.json_keys:
            raise DataError("json_keys must name at least one key")
        self.json_keys = tuple(self.json_keys)

    @property
    def level(self) -> str:
        """``sentence`` with --split-sentences, else ``document``."""
        return "sentence" if self.split_sentences else "document"

    def output_prefixes(self) -> Dict[str, str]:
        """JSON key -> output prefix ``{output_prefix}_{key}_{level}``."""
        return {key: f"{self.output_prefix}_{key}_{self.level}" for key in self.json_keys}


@dataclass
class PreprocessStats:
    """What a run read and wrote."""

    documents: int = 0
    bytes_read: int = 0
    bad_lines: int = 0
    empty_documents: Dict[str, int] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    sequences: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: Dict[str, str] = field(default_factory=dict)

    def add(self, other: "PreprocessStats") -> None:
        """Accumulate another partition's counts."""
        self.documents += other.documents
        self.bytes_read += other.bytes_read
        self.bad_lines += other.bad_lines
        for mine, theirs in ((self.empty_documents, other.empty_documents),
                             (self.tokens, other.tokens), (self.sequences, other.sequences)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


class DocumentEncoder:
    """Turns one JSONL line into token arrays per key (runs inside the worker processes)."""

    def __init__(self, path: str, tokenizer_kwargs: Dict[str, Any], json_keys: Sequence[str],
                 append_eod: bool, split: bool):
        from ..tokenizer import build_tokenizer

        self.path = path
        self.tokenizer = build_tokenizer(**tokenizer_kwargs)
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod
        self.split = split
        self.dtype = best_fitting_dtype(self.tokenizer.vocab_size)
        self.max_id = np.iinfo(self.dtype).max

    def encode_line(self, line_no: int, raw: bytes):
        """("ok", line_no, bytes, {key: (ids, lengths)}), ("bad", line_no, message) for a
        malformed line, or ("fatal", line_no, message) for ids that do not fit the dtype."""
        where = f"{self.path} line {line_no}"
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError:
            return ("bad", line_no, f"{where}: not valid UTF-8")
        except json.JSONDecodeError as e:
            return ("bad", line_no, f"{where}: not valid JSON ({e.msg} at column {e.colno})")
        if not isinstance(doc, dict):
            return ("bad", line_no, f"{where}: expected a JSON object, got {type(doc).__name__}")
        out = {}
        for key in self.json_keys:
            if key not in doc:
                return ("bad", line_no, f"{where}: missing JSON key {key!r}")
            text = doc[key]
            if not isinstance(text, str):
                return ("bad", line_no, f"{where}: JSON key {key!r} is not a string")
            if not text.strip():  # whitespace only counts as empty
                pieces = []
            else:
                pieces = split_sentences(text) if self.split else [text]
            sentences = [ids for ids in map(self.tokenizer.tokenize, pieces) if ids]
            if sentences and self.append_eod:
                sentences[-1].append(self.tokenizer.eod)
            lengths = np.asarray([len(s) for s in sentences], dtype=np.int64)
            ids = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int64,
                              count=int(lengths.sum()))
            if ids.size:
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high > self.max_id:
                    # a tokenizer / dtype mismatch, not a bad line: never skipped
                    return ("fatal", line_no, f"{where}: token id {high if high > self.max_id else low} "
                                              f"does not fit the output dtype {self.dtype} (allowed "
                                              f"0..{self.max_id} for a vocabulary of {self.tokenizer.vocab_size})")
                ids = ids.astype(self.dtype)  # smaller to ship back; the writer re-checks
            out[key] = (ids, lengths)
        return ("ok", line_no, len(raw), out)

    def encode_batch(self, batch: List[Tuple[int, bytes]]):
        """Encode a batch of (line number, raw line)."""
        return [self.encode_line(n, raw) for n, raw in batch]


_worker_encoder: Optional[DocumentEncoder] = None


def _init_worker(*args) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(*args)


def _encode_in_worker(batch):
    return _worker_encoder.encode_batch(batch)


def _read_batches(path: str, start: int, end: int, line_base: int):
    """Batches of (line number, raw line) from byte range [start, end); blank lines skipped."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, line_no, batch, size = start, line_base, [], 0
        while pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            line_no += 1
            if not line.strip():
                continue
            batch.append((line_no, line))
            size += len(line)
            if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


def _process_range(config: PreprocessConfig, prefixes: Dict[str, str], start: int, end: int,
                   line_base: int, workers: int, log: Callable[[str], None], tag: str = "") -> PreprocessStats:
    """Tokenize one byte range of the input into the datasets at ``prefixes`` (key -> prefix)."""
    args = (config.input, config.tokenizer, config.json_keys, config.append_eod, config.split_sentences)
    encoder = DocumentEncoder(*args)
    stats = PreprocessStats(empty_documents={k: 0 for k in prefixes}, tokens={k: 0 for k in prefixes},
                            sequences={k: 0 for k in prefixes})
    writers: Dict[str, IndexedDatasetWriter] = {}
    pool = None
    t0 = time.time()
    next_log = config.log_interval

    def consume(results) -> None:
        nonlocal next_log
        for result in results:
            if result[0] == "fatal":
                raise DataError(result[2])
            if result[0] == "bad":
                if not config.skip_bad_lines:
                    raise DataError(result[2])
                stats.bad_lines += 1
                if stats.bad_lines <= MAX_WARNINGS:
                    log(f"{tag}skipping {result[2]}")
                continue
            _, line_no, nbytes, per_key = result
            stats.documents += 1
            stats.bytes_read += nbytes
            for key, (ids, lengths) in per_key.items():
                if len(lengths) == 0:
                    stats.empty_documents[key] += 1
                    continue
                try:
                    writers[key].add_document(ids, lengths)
                except DataError as e:
                    raise DataError(f"{config.input} line {line_no}: {e}") from None
                stats.tokens[key] += int(ids.size)
                stats.sequences[key] += len(lengths)
            if stats.documents >= next_log:
                elapsed = max(time.time() - t0, 1e-9)
                log(f"{tag}processed {stats.documents} documents "
                    f"({stats.documents / elapsed:.1f} docs/s, {stats.bytes_read / elapsed / 1e6:.2f} MB/s)")
                next_log += config.log_interval

    try:
        for key, prefix in prefixes.items():
            writers[key] = IndexedDatasetWriter(prefix, encoder.dtype)
        batches = _read_batches(config.input, start, end, line_base)
        if workers == 1:
            for batch in batches:
                consume(encoder.encode_batch(batch))
        else:
            pool = mp.Pool(workers, initializer=_init_worker, initargs=args)
            pending: deque = deque()
            for batch in batches:
                pending.append(pool.apply_async(_encode_in_worker, (batch,)))
                while len(pending) >= 4 * workers:
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.seconds = time.time() - t0
    return stats


def _partition_bounds(path: str, partitions: int) -> List[Tuple[int, int, int]]:
    """(start byte, end byte, lines before start) of up to ``partitions`` line-aligned ranges."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:
        for i in range(1, partitions):
            f.seek(size * i // partitions)
            f.readline()
            pos = f.tell()
            if starts[-1] < pos < size:
                starts.append(pos)
        bounds, lines, pos = [], 0, 0
        f.seek(0)
        for i, start in enumerate(starts):
            while pos < start:  # count the lines before this partition
                chunk = f.read(min(1 << 24, start - pos))
                lines += chunk.count(b"\n")
                pos += len(chunk)
            end = starts[i + 1] if i + 1 < len(starts) else size
            bounds.append((start, end, lines))
    return bounds


def _partition_main(config, prefixes, start, end, line_base, workers, index, results) -> None:
    try:
        stats = _process_range(config, prefixes, start, end, line_base, workers,
                               log=lambda m: print(m, flush=True), tag=f"[partition {index}] ")
        results.put((index, "ok", stats))
    except (DataError, ValueError) as e:
        results.put((index, "error", str(e)))
    except BaseException:
        results.put((index, "crash", traceback.format_exc()))


def _run_partitions(config: PreprocessConfig, prefixes: Dict[str, str], work_dir: str,
                    log: Callable[[str], None]) -> PreprocessStats:
    bounds = _partition_bounds(config.input, config.partitions)
    workers = max(1, config.workers // len(bounds))
    log(f"{len(bounds)} partitions, {workers} worker(s) each")
    ctx = mp.get_context()
    results = ctx.Queue()
    part_prefixes = [{k: os.path.join(work_dir, f"part{i}_{k}") for k in prefixes} for i in range(len(bounds))]
    procs = [ctx.Process(target=_partition_main,
                         args=(config, part_prefixes[i], s, e, lines, workers, i, results))
             for i, (s, e, lines) in enumerate(bounds)]
    for p in procs:
        p.start()
    done: Dict[int, PreprocessStats] = {}
    try:
        while len(done) < len(procs):
            try:
                index, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                for i, p in enumerate(procs):
                    if i not in done and not p.is_alive() and p.exitcode not in (0, None):
                        raise DataError(f"partition {i} died with exit code {p.exitcode}")
                continue
            if status == "error":
                raise DataError(payload)
            if status == "crash":
                raise RuntimeError(f"partition {index} failed:\n{payload}")
            done[index] = payload
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    total = PreprocessStats()
    for i in range(len(procs)):
        total.add(done[i])
    log("merging partitions")
    for key, prefix in prefixes.items():
        merge_datasets([parts[key] for parts in part_prefixes], prefix)
    return total


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = print) -> PreprocessStats:
    """Run the whole preprocessing; returns counts. Raises :class:`DataError` on bad input,
    leaving no output file behind."""
    from ..tokenizer import build_tokenizer

    if not os.path.isfile(config.input):
        raise DataError(f"input file {config.input} does not exist")
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    if not os.path.isdir(out_dir):
        raise DataError(f"output folder {out_dir} does not exist")
    tokenizer = build_tokenizer(**config.tokenizer)  # fail early, in the main process
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    prefixes = config.output_prefixes()
    log(f"input {config.input} ({os.path.getsize(config.input) / 1e6:.1f} MB), tokenizer "
        f"{type(tokenizer).__name__} (vocab {tokenizer.vocab_size}, dtype {dtype}), "
        f"{config.workers} worker(s)")
    t0 = time.time()
    # Everything is written inside a hidden folder next to the outputs and moved to the final
    # names only at the end, so a failure (or a crash) never leaves a partial output.
    work_dir = tempfile.mkdtemp(prefix=".preprocess-", dir=out_dir)
    try:
        tmp_prefixes = {k: os.path.join(work_dir, k) for k in prefixes}
        if config.partitions == 1:
            stats = _process_range(config, tmp_prefixes, 0, os.path.getsize(config.input), 0,
                                   config.workers, log)
        else:
            stats = _run_partitions(config, tmp_prefixes, work_dir, log)
        _check_not_empty(config, stats)
        for key, prefix in prefixes.items():
            for suffix in (".bin", ".idx"):
                os.replace(tmp_prefixes[key] + suffix, prefix + suffix)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    stats.seconds = time.time() - t0
    stats.outputs = dict(prefixes)
    elapsed = max(stats.seconds, 1e-9)
    log(f"done: {stats.documents} documents, {stats.bytes_read / 1e6:.1f} MB in {stats.seconds:.1f}s "
        f"({stats.documents / elapsed:.1f} docs/s, {stats.bytes_read / elapsed / 1e6:.2f} MB/s)")
    for key, prefix in prefixes.items():
        log(f"  {prefix}.bin/.idx: {stats.sequences.get(key, 0)} {config.level}s, "
            f"{stats.tokens.get(key, 0)} tokens, {stats.empty_documents.get(key, 0)} empty documents skipped")
    if stats.bad_lines:
        log(f"  skipped {stats.bad_lines} bad line(s)")
    return stats


def _check_not_empty(config: PreprocessConfig, stats: PreprocessStats) -> None:
    empty = [k for k in config.json_keys if stats.tokens.get(k, 0) == 0]
    if not empty:
        return
    detail = (f"{stats.documents} documents read, all empty" if stats.documents
              else "no documents read")
    raise DataError(f"input file {config.input} has no non-empty documents for key "
                    f"{empty[0]!r} ({detail}, {stats.bad_lines} bad lines skipped)")
