"""The C++ index builders equal their Python references, and the references mean what they say."""
import numpy as np
import pytest

from megatron_lsh.data import helpers, helpers_ref
from megatron_lsh.data.errors import DataError

try:
    from megatron_lsh.data import _helpers as cpp
except ImportError:  # pragma: no cover - the test command builds it
    cpp = None

needs_cpp = pytest.mark.skipif(cpp is None, reason="C++ helpers not built (python setup.py build_ext --inplace)")


def _random_docs(rng, max_docs=30, max_len=25):
    n = int(rng.integers(1, max_docs))
    sizes = rng.integers(0, max_len, n).astype(np.int32)
    epochs = int(rng.integers(1, 4))
    doc_idx = np.concatenate([rng.permutation(n) for _ in range(epochs)]).astype(np.int64)
    return sizes, doc_idx


def test_cpp_extension_is_built():
    assert helpers.compiled_helpers_available(), "run: python setup.py build_ext --inplace"


@needs_cpp
def test_sample_idx_cpp_equals_reference():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(300):
        sizes, doc_idx = _random_docs(rng)
        total = int(sizes[doc_idx].sum())
        seq = int(rng.integers(1, 12))
        if total < seq + 1:
            continue
        n = (total - 1) // seq
        for num in (n, int(rng.integers(0, n + 1))):
            a = cpp.build_sample_idx(sizes, doc_idx, seq, num)
            b = helpers_ref.build_sample_idx(sizes, doc_idx, seq, num)
            assert a.dtype == b.dtype == np.int64 and np.array_equal(a, b)
            checked += 1
    assert checked > 300


def test_sample_idx_windows_cover_the_stream():
    rng = np.random.default_rng(2)
    sizes = rng.integers(0, 9, 40).astype(np.int32)
    doc_idx = rng.permutation(40).astype(np.int64)
    docs = [rng.integers(0, 100, int(s)) for s in sizes]
    stream = np.concatenate([docs[d] for d in doc_idx])
    seq = 5
    n = (len(stream) - 1) // seq
    idx = helpers.build_sample_idx(sizes, doc_idx, seq, n)
    for k in range(n):
        (d0, o0), (d1, o1) = idx[k], idx[k + 1]
        pieces = [docs[doc_idx[d0]][o0:]] + [docs[doc_idx[d]] for d in range(d0 + 1, d1)]
        if d0 == d1:
            pieces = [docs[doc_idx[d0]][o0:o1 + 1]]
        else:
            pieces.append(docs[doc_idx[d1]][:o1 + 1])
        assert np.array_equal(np.concatenate(pieces), stream[k * seq:k * seq + seq + 1])
        assert sizes[doc_idx[d0]] > o0  # rows always point inside a non-empty document


@needs_cpp
def test_blending_cpp_equals_reference_and_tracks_weights():
    rng = np.random.default_rng(3)
    for _ in range(100):
        w = rng.random(int(rng.integers(1, 6))) + 1e-3
        w /= w.sum()
        size = int(rng.integers(0, 400))
        a = cpp.build_blending_indices(w, size)
        b = helpers_ref.build_blending_indices(w, size)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        for i in range(0, size, 37):  # every prefix is within one sample of its weight
            counts = np.bincount(a[0][:i + 1], minlength=len(w))
            assert np.all(np.abs(counts - w * (i + 1)) <= 1.0 + 1e-9)
        for d in range(len(w)):  # the within-dataset indices count up from 0
            assert a[1][a[0] == d].tolist() == list(range(int((a[0] == d).sum())))


@needs_cpp
def test_mapping_cpp_equals_reference():
    rng = np.random.default_rng(4)
    for _ in range(300):
        n = int(rng.integers(0, 40))
        sizes = rng.integers(0, 15, n).astype(np.int32)
        cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 8))))
        bounds = np.concatenate([[0], cuts, [n]]).astype(np.int64)
        for cross in (True, False):
            args = (bounds, sizes, int(rng.integers(2, 40)), int(rng.integers(1, 4)),
                    int(rng.integers(-1, 25)), float(rng.choice([0.0, 0.25, 1.0])),
                    int(rng.integers(0, 2 ** 63)), cross)
            a, b = cpp.build_mapping(*args), helpers_ref.build_mapping(*args)
            assert a.shape == b.shape and np.array_equal(a, b), args


@pytest.mark.parametrize("cross", [True, False])
def test_mapping_packs_whole_sentences_within_the_budget(cross):
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 12, 200).astype(np.int32)
    bounds = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 200), 19, replace=False)), [200]])
    doc_of = np.searchsorted(bounds, np.arange(200), side="right") - 1
    rows = helpers.build_mapping(bounds, sizes, 30, 1, -1, 0.0, 7, cross)
    assert rows[0, 0] == 0 and rows[-1, 1] == 200
    assert np.array_equal(rows[1:, 0], rows[:-1, 1])  # consecutive, every sentence exactly once
    for start, end, target in rows:
        assert target == 30
        crossings = len(set(doc_of[start:end])) - 1
        if not cross:
            assert crossings == 0
        if end - start > 1:
            assert sizes[start:end].sum() + crossings <= target


def test_mapping_short_sequences_and_epochs():
    sizes = np.full(100, 3, dtype=np.int32)
    bounds = np.asarray([0, 100])
    rows = helpers.build_mapping(bounds, sizes, 30, 100, 250, 0.5, 11)
    assert len(rows) == 250
    short = rows[:, 2] < 30
    assert 0.3 < short.mean() < 0.7 and rows[:, 2].min() >= 2
    one_epoch = helpers.build_mapping(bounds, sizes, 30, 1, -1, 0.0, 11)
    assert len(one_epoch) == 10  # 100 sentences of 3 tokens, 10 per sample


def test_fallback_references_used_when_asked():
    sizes = np.asarray([4, 4], dtype=np.int32)
    out = helpers.build_sample_idx(sizes, np.asarray([0, 1]), 3, 2, use_compiled=False)
    assert out.tolist() == [[0, 0], [0, 3], [1, 2]]


@pytest.mark.parametrize("call,phrase", [
    (lambda: helpers.build_sample_idx(np.asarray([3], np.int32), np.asarray([0]), 2, 5), "at most 1"),
    (lambda: helpers.build_sample_idx(np.asarray([3], np.int32), np.asarray([0]), 0, 1), "seq_length"),
    (lambda: helpers.build_blending_indices([0.5, -1], 10), "non-negative"),
    (lambda: helpers.build_blending_indices([], 10), "non-negative"),
    (lambda: helpers.build_mapping(np.asarray([0, 5]), np.ones(3, np.int32), 10, 1, -1, 0, 1), "within sizes"),
    (lambda: helpers.build_mapping(np.asarray([0]), np.ones(3, np.int32), 1, 1, -1, 0, 1), "at least 2"),
])
def test_wrapper_validation(call, phrase):
    with pytest.raises(DataError, match=phrase):
        call()
