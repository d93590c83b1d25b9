"""The MMIDIDX indexed dataset: round trips, the byte layout, merging, and every bad file."""
import os
import pickle
import struct

import numpy as np
import pytest

from megatron_lsh.data import indexed as ix
from megatron_lsh.data.errors import DataError
from megatron_lsh.data.indexed import (IndexedDataset, IndexedDatasetWriter, best_fitting_dtype,
                                       merge_datasets, write_dataset)
from tests.fixtures.data_helpers import load_tool

DOCS = [[[1, 2, 3], [4, 5]], [[6]], [[7, 8, 9, 10]], [[], [11]]]  # sentences per document


def _write(prefix, docs=DOCS, dtype=np.uint16):
    write_dataset(str(prefix), docs, dtype)
    return str(prefix)


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip(tmp_path, dtype):
    prefix = _write(tmp_path / "ds", dtype=dtype)
    ds = IndexedDataset(prefix)
    sentences = [s for doc in DOCS for s in doc]
    assert len(ds) == len(sentences) and ds.num_documents == len(DOCS)
    assert ds.dtype == np.dtype(dtype)
    for i, s in enumerate(sentences):
        assert ds[i].tolist() == s
    assert [a.tolist() for a in ds[1:3]] == sentences[1:3]
    assert ds[-1].tolist() == [11]
    assert ds.get(0, 1, 2).tolist() == [2, 3] and ds.get(3, 2).tolist() == [9, 10]
    assert ds.sequence_lengths.tolist() == [len(s) for s in sentences]
    assert ds.document_indices.tolist() == [0, 2, 3, 4, 6]
    assert [[a.tolist() for a in ds.document(d)] for d in range(4)] == DOCS
    assert ds.num_tokens == sum(len(s) for s in sentences)
    again = pickle.loads(pickle.dumps(ds))
    assert again[3].tolist() == [7, 8, 9, 10]
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_idx_layout_byte_by_byte(tmp_path):
    """Parse the files with struct/numpy only (not our reader) against the documented layout."""
    prefix = _write(tmp_path / "ds")
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n_seq, n_doc) == (1, 8, 6, 5)
    assert len(raw) == 34 + 4 * n_seq + 8 * n_seq + 8 * n_doc
    lengths = np.frombuffer(raw, "<i4", n_seq, 34)
    pointers = np.frombuffer(raw, "<i8", n_seq, 34 + 4 * n_seq)
    docs = np.frombuffer(raw, "<i8", n_doc, 34 + 12 * n_seq)
    assert lengths.tolist() == [3, 2, 1, 4, 0, 1]
    assert pointers.tolist() == [0, 6, 10, 12, 20, 20]  # bytes, 2 per uint16 token
    assert docs.tolist() == [0, 2, 3, 4, 6]
    data = open(prefix + ".bin", "rb").read()
    assert data == np.arange(1, 12, dtype="<u2").tobytes()


def test_reads_an_independently_written_index(tmp_path):
    """A file laid out by hand (as Megatron-LM writes it, int32 tokens) reads back correctly."""
    seqs = [[5, 6], [7], [8, 9, 10]]
    lengths = [len(s) for s in seqs]
    pointers = np.cumsum([0] + lengths[:-1]) * 4
    with open(tmp_path / "m.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4))
        f.write(struct.pack("<Q", 3) + struct.pack("<Q", 3))
        f.write(np.asarray(lengths, "<i4").tobytes() + np.asarray(pointers, "<i8").tobytes())
        f.write(np.asarray([0, 1, 3], "<i8").tobytes())
    with open(tmp_path / "m.bin", "wb") as f:
        f.write(np.asarray([t for s in seqs for t in s], "<i4").tobytes())
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.int32 and [a.tolist() for a in ds[0:3]] == seqs
    assert ds.document_indices.tolist() == [0, 1, 3]


def test_best_fitting_dtype():
    assert best_fitting_dtype(8004) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32


def test_streaming_writer_spills_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(ix, "_SPILL_BLOCK", 3)
    monkeypatch.setattr(ix, "_COPY_BLOCK", 2)
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 1000, rng.integers(0, 9)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(25)]
    ds = IndexedDataset(_write(tmp_path / "s", docs))
    flat = [s for d in docs for s in d]
    assert [a.tolist() for a in ds[0:len(ds)]] == flat
    assert ds.sequence_pointers.tolist() == (np.cumsum([0] + [len(s) for s in flat[:-1]]) * 2).tolist()
    assert ds.document_indices.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()


@pytest.mark.parametrize("bad", [70000, -1])
def test_ids_overflowing_the_dtype(tmp_path, bad):
    with pytest.raises(DataError) as e:
        with IndexedDatasetWriter(str(tmp_path / "o"), np.uint16) as w:
            w.add_document([1, 2])
            w.add_document([3, bad, 4])
    msg = str(e.value)
    assert f"token id {bad} in sequence 1" in msg and "uint16" in msg and "\n" not in msg
    assert _files(tmp_path) == []  # aborted: nothing left behind


def test_writer_rejects_unknown_dtype_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="cannot be stored"):
        IndexedDatasetWriter(str(tmp_path / "x"), np.float16)
    with pytest.raises(DataError, match="does not exist"):
        IndexedDatasetWriter(str(tmp_path / "nope" / "x"))


def _corrupt(prefix, case):
    idx, binf = prefix + ".idx", prefix + ".bin"
    raw = bytearray(open(idx, "rb").read())
    if case == "missing_idx":
        os.remove(idx)
    elif case == "missing_bin":
        os.remove(binf)
    elif case == "short_header":
        open(idx, "wb").write(raw[:20])
    elif case == "truncated_idx":
        open(idx, "wb").write(raw[:-8])
    elif case == "extra_idx":
        open(idx, "wb").write(raw + b"\x00" * 8)
    elif case == "wrong_magic":
        raw[:9] = b"NOTANIDX\x00"
        open(idx, "wb").write(raw)
    elif case == "wrong_version":
        raw[9:17] = struct.pack("<Q", 2)
        open(idx, "wb").write(raw)
    elif case == "unknown_dtype":
        raw[17] = 9
        open(idx, "wb").write(raw)
    elif case == "bad_doc_indices":
        raw[-8:] = struct.pack("<q", 5)
        open(idx, "wb").write(raw)
    elif case == "truncated_bin":
        data = open(binf, "rb").read()
        open(binf, "wb").write(data[:-2])
    elif case == "bigger_bin":
        open(binf, "ab").write(b"\x00\x00")


@pytest.mark.parametrize("case,file,phrase", [
    ("missing_idx", ".idx", "is missing"),
    ("missing_bin", ".bin", "is missing"),
    ("short_header", ".idx", "truncated: 20 bytes"),
    ("truncated_idx", ".idx", "is truncated"),
    ("extra_idx", ".idx", "8 bytes more"),
    ("wrong_magic", ".idx", "not an MMIDIDX index"),
    ("wrong_version", ".idx", "version 2"),
    ("unknown_dtype", ".idx", "unknown dtype code 9"),
    ("bad_doc_indices", ".idx", "document indices must run from 0 to 6"),
    ("truncated_bin", ".bin", "has 20 bytes but"),
    ("bigger_bin", ".bin", "has 24 bytes but"),
])
def test_bad_files_are_named_in_one_sentence(tmp_path, case, file, phrase):
    prefix = _write(tmp_path / "ds")
    _corrupt(prefix, case)
    with pytest.raises(DataError) as e:
        IndexedDataset(prefix)
    msg = str(e.value)
    assert phrase in msg and (prefix + file) in msg and "\n" not in msg


def test_nonexistent_prefix(tmp_path):
    with pytest.raises(DataError, match="does not exist: neither"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_merge(tmp_path):
    a = _write(tmp_path / "a", [[[1, 2]], [[3]]])
    b = _write(tmp_path / "b", [[[4], [5, 6]]])
    merged = merge_datasets([a, b], str(tmp_path / "m"))
    assert [x.tolist() for x in merged[0:len(merged)]] == [[1, 2], [3], [4], [5, 6]]
    assert merged.document_indices.tolist() == [0, 1, 2, 4]
    c = _write(tmp_path / "c", [[[7]]], dtype=np.int32)
    with pytest.raises(DataError, match="dtype int32"):
        merge_datasets([a, c], str(tmp_path / "bad"))
    assert not any(n.startswith("bad") for n in _files(tmp_path))


def test_merge_tool(tmp_path, capsys):
    tool = load_tool("merge_datasets")
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(folder / "p0", [[[1]]])
    _write(folder / "p1", [[[2, 3]]])
    assert tool.main(["--input", str(folder), "--output-prefix", str(tmp_path / "all")]) == 0
    assert [x.tolist() for x in IndexedDataset(str(tmp_path / "all"))[0:2]] == [[1], [2, 3]]
    assert tool.main(["--input", str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset prefix") and err.count("\n") == 1
