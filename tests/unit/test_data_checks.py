"""Data checks before training: token ids against the vocabulary (cached scan), empty data."""
import os

import numpy as np
import pytest

from megatron_lsh.data import checks
from megatron_lsh.data.errors import DataError
from megatron_lsh.data.indexed import write_dataset
from megatron_lsh.tokenizer import TokenizerError


def test_an_id_beyond_the_vocabulary_is_named_with_the_file(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix, [[1, 2, 3], [4, 900, 5]])
    checks.check_token_ids([prefix], vocab_size=901)
    with pytest.raises(DataError, match=rf"^dataset {prefix}.bin holds token id 900 but the "
                                        rf"vocabulary has 900 tokens \(ids 0..899\)"):
        checks.check_token_ids([prefix], vocab_size=900)


def test_the_scan_is_cached_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    prefix, cache = str(tmp_path / "ds"), tmp_path / "cache"
    cache.mkdir()
    write_dataset(prefix, [[7, 8, 9]])
    assert checks.max_token_id(prefix, str(cache)) == 9
    assert len(os.listdir(cache)) == 1
    monkeypatch.setattr(checks.np, "memmap", None)        # a second scan would fail
    assert checks.max_token_id(prefix, str(cache)) == 9
    monkeypatch.undo()
    write_dataset(prefix, [[7, 8, 99, 1]])                 # new size: a new cache key
    assert checks.max_token_id(prefix, str(cache)) == 99


def test_a_dtype_too_small_for_the_vocabulary_needs_no_scan(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix, [[1, 200]], dtype=np.uint8)
    monkeypatch.setattr(checks, "max_token_id", None)      # must not be called
    checks.check_token_ids([prefix], vocab_size=300)


def test_an_empty_dataset_is_refused(tmp_path):
    prefix = str(tmp_path / "empty")
    write_dataset(prefix, [])
    with pytest.raises(DataError, match=rf"^dataset {prefix} holds no tokens"):
        checks.check_token_ids([prefix], vocab_size=10)


def test_an_empty_corpus_trains_no_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from megatron_lsh.tokenizer.train import train_bpe
    out = tmp_path / "tok"
    with pytest.raises(TokenizerError, match="^no text to train the tokenizer on"):
        train_bpe(iter(["", "  \n"]), 300, str(out), log=lambda *_: None)
    assert not out.exists()
