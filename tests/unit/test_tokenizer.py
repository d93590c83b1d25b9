"""Tokenizers: our GPT-2 BPE against the `tokenizers` library, special tokens, SentencePiece, errors."""
import json
import pickle

import pytest

from megatron_lsh.tokenizer import (TokenizerError, build_tokenizer, padded_vocab_size,
                                    sentinel_token)
from megatron_lsh.tokenizer import gpt2_bpe
from megatron_lsh.tokenizer.gpt2_bpe import byte_to_unicode_table
from tests.fixtures.data_helpers import (excerpt_texts, load_tool, train_tiny_bpe,
                                         train_tiny_sentencepiece, write_jsonl)

EDGE_TEXTS = [
    "", " ", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n", "don't we'll I'd they're",
    "numbers 1234567 and 3.14", "caf\u00e9 na\u00efve \u00fcber", "\u65e5\u672c\u8a9e\u306e\u6587",
    "emoji \U0001F600\U0001F3AD!", "punctuation!!! ...?! <|endoftext|> [brackets]", "a" * 300,
]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    return train_tiny_bpe(tmp_path_factory.mktemp("bpe"), vocab_size=500)


@pytest.fixture(scope="module")
def gpt2(bpe_files):
    vocab, merges, _ = bpe_files
    return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges, vocab_extra_ids=5)


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = byte_to_unicode_table()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"


def test_gpt2_round_trip_on_corpus_and_edge_texts(gpt2):
    for text in excerpt_texts() + EDGE_TEXTS:
        ids = gpt2.tokenize(text)
        assert all(0 <= i < gpt2.base_vocab_size for i in ids)
        assert gpt2.detokenize(ids) == text


def test_gpt2_ids_identical_to_the_tokenizers_library(gpt2, bpe_files):
    tokenizers = pytest.importorskip("tokenizers")
    vocab, merges, tokenizer_json = bpe_files
    reference = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    reference.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    from_json = tokenizers.Tokenizer.from_file(tokenizer_json)
    for text in excerpt_texts() + EDGE_TEXTS:
        ours = gpt2.tokenize(text)
        assert ours == reference.encode(text).ids
        if "<|endoftext|>" not in text:  # the library matches its special tokens inside text
            assert ours == from_json.encode(text, add_special_tokens=False).ids


def test_gpt2_special_tokens_follow_the_base_vocabulary(gpt2, bpe_files):
    base = len(json.load(open(bpe_files[0])))
    assert gpt2.base_vocab_size == base
    assert gpt2.eod == 0  # <|endoftext|> is in vocab.json
    assert [gpt2.pad, gpt2.mask, gpt2.cls, gpt2.sep] == [base, base + 1, base + 2, base + 3]
    assert gpt2.additional_special_tokens_ids == list(range(base + 4, base + 9))
    assert gpt2.vocab_size == base + 9
    assert gpt2.detokenize([gpt2.mask, gpt2.additional_special_tokens_ids[2]]) == "<mask><extra_id_2>"
    with pytest.raises(TokenizerError, match=f"token id {base + 9} is outside"):
        gpt2.detokenize([base + 9])
    # special spellings in text are ordinary text, never special ids
    assert gpt2.eod not in gpt2.tokenize("<|endoftext|>")


def test_gpt2_cache_and_pickle(gpt2, monkeypatch):
    text = excerpt_texts()[0]
    first = gpt2.tokenize(text)
    monkeypatch.setattr(gpt2_bpe, "_CACHE_LIMIT", 3)  # clearing the cache must not change results
    gpt2._cache.clear()
    assert gpt2.tokenize(text) == first and len(gpt2._cache) <= 3
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.tokenize(text) == first and clone.vocab_size == gpt2.vocab_size


def test_hugging_face_tokenizer(bpe_files, gpt2):
    pytest.importorskip("tokenizers")
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=bpe_files[2], vocab_extra_ids=5)
    text = excerpt_texts()[1]
    assert hf.tokenize(text) == gpt2.tokenize(text)
    assert hf.detokenize(hf.tokenize(text)) == text
    assert hf.special_token_ids == gpt2.special_token_ids
    assert pickle.loads(pickle.dumps(hf)).tokenize(text) == hf.tokenize(text)


def test_sentencepiece(tmp_path):
    pytest.importorskip("sentencepiece")
    model = train_tiny_sentencepiece(tmp_path, vocab_size=300)
    sp = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model, vocab_extra_ids=3)
    base = sp.base_vocab_size
    assert base <= 300 and sp.pad == 3 and sp.eod == 2 and sp.cls == 1 and sp.sep == 2
    assert sp.mask == base and sp.additional_special_tokens_ids == [base + 1, base + 2, base + 3]
    text = excerpt_texts()[2]
    ids = sp.tokenize(text)
    assert " ".join(sp.detokenize(ids).split()) == " ".join(text.split())  # SP normalises whitespace
    assert sp.detokenize([sp.additional_special_tokens_ids[0]]) == sentinel_token(0)
    assert pickle.loads(pickle.dumps(sp)).tokenize(text) == ids


def test_null_tokenizer_and_padding():
    tok = build_tokenizer("NullTokenizer", vocab_size=100, vocab_extra_ids=2)
    assert tok.tokenize("1 2  99") == [1, 2, 99] and tok.detokenize([1, 2]) == "1 2"
    assert tok.eod == 100 and tok.vocab_size == 107
    assert padded_vocab_size(8009, 128, 2) == 8192 and padded_vocab_size(256, 128) == 256


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(tokenizer_type="BertWordPiece"), "is not one of"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope/vocab.json", merge_file="m"), "/nope/vocab.json does not exist"),
    (dict(tokenizer_type="GPT2BPETokenizer"), "needs a vocab file"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope.model"), "/nope.model does not exist"),
    (dict(tokenizer_type="HuggingFaceTokenizer"), "needs --tokenizer-model"),
    (dict(tokenizer_type="NullTokenizer"), "positive vocab_size"),
])
def test_build_tokenizer_errors(kwargs, phrase):
    with pytest.raises(TokenizerError, match=phrase):
        build_tokenizer(**kwargs)


def test_bad_vocab_and_merges_files(tmp_path, bpe_files):
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="is not valid JSON"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad), merge_file=bpe_files[1])
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(TokenizerError, match="without gaps"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(gaps), merge_file=bpe_files[1])
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="line 2: expected two symbols"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=bpe_files[0], merge_file=str(merges))


def test_train_tokenizer_tool(tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in excerpt_texts()])
    assert tool.main(["--input", data, "--vocab-size", "400", "--output-dir", str(tmp_path / "bpe")]) == 0
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "bpe" / "vocab.json"),
                          merge_file=str(tmp_path / "bpe" / "merges.txt"))
    assert 300 < tok.base_vocab_size <= 400
    assert tool.main(["--input", data, "--tokenizer-type", "SentencePieceTokenizer", "--vocab-size", "250",
                      "--output-dir", str(tmp_path / "sp")]) == 0
    assert (tmp_path / "sp" / "spm.model").is_file()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{broken", {"text": "x"}])
    capsys.readouterr()
    for kind in ("GPT2BPETokenizer", "SentencePieceTokenizer"):
        out = tmp_path / f"bad-{kind}"
        assert tool.main(["--input", bad, "--tokenizer-type", kind, "--vocab-size", "260",
                          "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad} line 2: not valid JSON") and err.count("\n") == 1
        assert not out.exists() or list(out.iterdir()) == []
