"""GLUE task files in GLUE's own formats read into examples; bad files are one sentence; the
metrics give known values (scipy's documented examples, hand-computed confusion counts)."""
from __future__ import annotations

import math

import pytest

from megatron_lsh.glue.data import (TASKS, GlueDataError, get_task, read_split,
                                    write_predictions)
from megatron_lsh.glue.metrics import (accuracy, f1, matthews_corr, pearson, score,
                                       spearman)

# Headers as GLUE distributes the files (CoLA train/dev have none).
FILES = {
    "CoLA": {"train.tsv": "gj04\t1\t\tOur friends won't buy this analysis.\n"
                          "gj04\t0\t*\tThey drank the pub.\n",
             "test.tsv": "index\tsentence\n0\tBill whistled past the house.\n"},
    "SST-2": {"train.tsv": "sentence\tlabel\nit 's a charming journey \t1\ndull \t0\n",
              "test.tsv": "index\tsentence\n0\tuneasy mishmash\n"},
    "MRPC": {"train.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                          "1\t702876\t702977\tAmrozi accused his brother .\tHe called him .\n",
             "test.tsv": "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA \"q\tB\n"},
    "QQP": {"train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                         "133273\t213221\t213222\tHow is the life?\tHow is life?\t1\n",
            "test.tsv": "id\tquestion1\tquestion2\n0\tWhy?\tWhy not?\n"},
    "STS-B": {"train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\t"
                           "sentence1\tsentence2\tscore\n0\tmain\tf\t2012\t1\tnone\tnone\t"
                           "A plane is taking off.\tAn air plane is taking off.\t5.000\n",
              "test.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\t"
                          "sentence1\tsentence2\n0\tmain\tf\t2012\t1\tnone\tnone\tA\tB\n"},
    "MNLI": {"train.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                          "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
                          "sentence1\tsentence2\tlabel1\tgold_label\n"
                          "0\t1\t1n\tgov\t(\t(\t(\t(\tConceptually cream skimming .\t"
                          "Product and geography .\tneutral\tneutral\n",
             "test_matched.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                                 "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
                                 "sentence1\tsentence2\n7\t1\t1\tgov\t(\t(\t(\t(\tA\tB\n"},
    "QNLI": {"train.tsv": "index\tquestion\tsentence\tlabel\n0\tWhen?\tIn 1900.\tentailment\n"},
    "RTE": {"train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA\tB\tnot_entailment\n"},
    "WNLI": {"train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA\tB\t1\n"},
}


def write(tmp_path, task, files):
    folder = tmp_path / task
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return str(folder)


def test_all_nine_tasks_are_known():
    assert list(TASKS) == ["CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE",
                           "WNLI"]
    assert get_task("sst2") is TASKS["SST-2"] and get_task("mnli").num_classes == 3
    with pytest.raises(GlueDataError, match=r"^--task must be one of CoLA, SST-2"):
        get_task("SQuAD")


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_task_reads_its_own_columns(tmp_path, name):
    task, folder = TASKS[name], write(tmp_path, name, FILES[name])
    train = read_split(task, folder, "train")
    assert len(train[0].texts) == len(task.text_columns)
    assert all(t for t in train[0].texts)
    if task.is_regression:
        assert train[0].label == 5.0
    else:
        assert 0 <= train[0].label < task.num_classes
    tests = [s for s in task.test_splits if f"{s}.tsv" in FILES[name]]
    for split in tests:
        (example,) = read_split(task, folder, split)
        assert example.label is None and example.index in ("0", "7")


def test_known_values_of_the_parsed_examples(tmp_path):
    folder = write(tmp_path, "CoLA", FILES["CoLA"])
    cola = read_split(TASKS["CoLA"], folder, "train")
    assert [(e.texts, e.label) for e in cola] == [
        (("Our friends won't buy this analysis.",), 1), (("They drank the pub.",), 0)]
    mnli = read_split(TASKS["MNLI"], write(tmp_path, "MNLI", FILES["MNLI"]), "train")
    assert mnli[0].texts == ("Conceptually cream skimming .", "Product and geography .")
    assert mnli[0].label == TASKS["MNLI"].labels.index("neutral")
    # Quotes are text, not CSV quoting.
    (mrpc,) = read_split(TASKS["MRPC"], write(tmp_path, "MRPC", FILES["MRPC"]), "test")
    assert mrpc.texts == ('A "q', "B")


@pytest.mark.parametrize("name, files, message", [
    ("MRPC", {"train.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\n1\t2\t3\tA\n"},
     r"^train.tsv of MRPC \(.*\) has no column '#2 String' \(its columns: Quality, #1 ID, "
     r"#2 ID, #1 String\)$"),
    ("RTE", {"train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA\tB\tentailment\n"
                          "1\tA\tB\tmaybe\n"},
     r"^train.tsv of RTE line 3: label 'maybe' is not one of entailment, not_entailment$"),
    ("SST-2", {"train.tsv": "sentence\tlabel\n"}, r"^train.tsv of SST-2 \(.*\) has no examples$"),
    ("STS-B", {"train.tsv": FILES["STS-B"]["train.tsv"].replace("5.000", "high")},
     r"^train.tsv of STS-B line 2: score 'high' is not a number$"),
    ("QNLI", {}, r"^QNLI has no train.tsv in "),
])
def test_bad_task_files_are_one_sentence(tmp_path, name, files, message):
    with pytest.raises(GlueDataError, match=message):
        read_split(TASKS[name], write(tmp_path, name, files), "train")


def test_submission_file(tmp_path):
    task = TASKS["RTE"]
    examples = read_split(task, write(tmp_path, "RTE", FILES["RTE"]), "train")
    write_predictions(task, str(tmp_path / "RTE.tsv"), examples, [0])
    assert (tmp_path / "RTE.tsv").read_text() == "index\tprediction\n0\tentailment\n"
    write_predictions(TASKS["STS-B"], str(tmp_path / "STS-B.tsv"), examples, [6.2])
    assert (tmp_path / "STS-B.tsv").read_text().splitlines()[1] == "0\t5.000"


def test_metrics_known_values():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]   # tp 2, fp 1, fn 1, tn 1
    assert accuracy(predictions, labels) == pytest.approx(3 / 5)
    assert f1(predictions, labels) == pytest.approx(2 / 3)
    assert matthews_corr(predictions, labels) == pytest.approx((2 - 1) / math.sqrt(3 * 3 * 2 * 2))
    assert matthews_corr([0, 0, 0], [0, 1, 0]) == 0.0 and f1([0, 0], [0, 0]) == 0.0
    # scipy's documented examples of pearsonr and spearmanr.
    assert pearson([1, 2, 3, 4, 5], [10, 9, 2.5, 6, 4]) == pytest.approx(-0.7426106572325057)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert score(TASKS["MRPC"], predictions, labels) == {"f1": pytest.approx(2 / 3),
                                                         "accuracy": pytest.approx(0.6)}
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 0, 1], [1, 0])
