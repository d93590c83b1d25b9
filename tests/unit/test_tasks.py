"""Tasks (one per model kind), the models' registry, and the seed scheme.

* Every task names a registered model class and a dataset class; the recipes' kinds are tasks.
* A task's batch -> model inputs gives exactly keyword arguments of the model's forward, for
  batches shaped like its dataset's items; layer counts and tokens per sample per kind.
* Synthetic batches are pinned (hashes of the tensors): benchmarks and tests that use them
  keep their numbers. Seed functions and seed parts are pinned for the same reason: they fix
  every initial weight.
* The loop and the run's data code never compare against a kind name.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
from pathlib import Path

import pytest
import torch

from megatron_lsh.config import ConfigError, MegatronLSHConfig
from megatron_lsh.data.builder import DATASET_KINDS
from megatron_lsh.models import MODEL_CLASSES, RECIPES, get_recipe
from megatron_lsh.models.synthetic import synthetic_batch
from megatron_lsh.parallel.random import SeedPart, layer_seed, mix_seed
from megatron_lsh.training.tasks import TASKS, Task, get_task

REPO = Path(__file__).resolve().parents[2]
KINDS = ("gpt", "roberta", "t5")


def test_tasks_match_the_model_registry_and_the_recipes():
    # The registry also holds the fine-tuning classifier, whose task is built per GLUE task.
    assert sorted(TASKS) == sorted(KINDS + ("swin",))
    assert set(MODEL_CLASSES) == set(TASKS) | {"gpt-classifier"}
    for name, task in TASKS.items():
        assert task.name == name and task.model_class is MODEL_CLASSES[name]
        assert task.model_class.kind == name
        if name in KINDS:   # the language models: token datasets, Megatron's loss name
            assert task.dataset_class in DATASET_KINDS.values()
            assert task.loss_name == "lm loss"
    assert {recipe.kind for recipe in RECIPES.values()} <= set(TASKS)
    with pytest.raises(ConfigError, match="model kind must be one of"):
        get_task("bert")


def test_the_fine_tuning_task_feeds_the_registered_classifier():
    from megatron_lsh.finetune.data import SplitDataset, encode_split
    from megatron_lsh.finetune.task import ClassificationTask
    from megatron_lsh.glue.data import Example
    from megatron_lsh.glue.data import get_task as glue_task
    from megatron_lsh.tokenizer.base import NullTokenizer
    task = ClassificationTask(glue_task("MNLI"))
    assert task.model_class is MODEL_CLASSES[task.name] and task.loss_name != "lm loss"
    split = encode_split(task.glue_task, "train", [Example(("1 2", "3"), 2, "0")],
                         NullTokenizer(16), 8)
    batch = torch.utils.data.default_collate([SplitDataset(split)[0]])
    forward = set(inspect.signature(task.model_class.forward).parameters) - {"self"}
    inputs = task.model_inputs(batch)
    assert set(inputs) <= forward and inputs["labels"].tolist() == [2]
    config = get_recipe("tiny-gpt-moe").model()
    model = task.build_model(config, get_recipe("tiny-gpt-moe").moe(), _single(), seed=1)
    assert model.classification_head.dense.out_features == 3


def _single():
    from megatron_lsh.parallel.dims import ProcessGroups
    return ProcessGroups.single()


def _dataset_batch(task: Task, config, b: int = 2) -> dict:
    """A collated batch with the keys the task's dataset items have."""
    s, sd = config.seq_length, config.decoder_seq_length
    ones = torch.ones(b, s, dtype=torch.long)
    if task.dataset_class is DATASET_KINDS["t5"]:
        return dict(encoder_tokens=ones, decoder_tokens=torch.ones(b, sd, dtype=torch.long),
                    encoder_padding_mask=ones, labels=torch.ones(b, sd, dtype=torch.long),
                    loss_mask=torch.ones(b, sd))
    return dict(tokens=ones, labels=ones, padding_mask=ones, loss_mask=torch.ones(b, s))


@pytest.mark.parametrize("kind", KINDS)
def test_model_inputs_are_forward_arguments(kind):
    task, config = TASKS[kind], get_recipe(f"tiny-{kind}-moe").model()
    forward = set(inspect.signature(task.model_class.forward).parameters) - {"self"}
    inputs = task.model_inputs(_dataset_batch(task, config))
    assert set(inputs) <= forward and "labels" in inputs and "hidden_states" not in inputs
    hidden = torch.zeros(1)
    assert task.model_inputs(_dataset_batch(task, config), hidden)["hidden_states"] is hidden
    for key, value in inputs.items():
        if "padding_mask" in key:
            assert value.dtype == torch.bool
    synthetic = task.synthetic_batch(config, 2, seed=0)
    assert set(synthetic) - {"loss_mask"} <= forward


def test_layer_counts_and_tokens_per_sample():
    gpt, t5 = get_recipe("tiny-gpt-moe").model(), get_recipe("tiny-t5-moe").model()
    assert TASKS["gpt"].total_num_layers(gpt) == gpt.num_layers == 4
    assert TASKS["gpt"].decoder_num_layers(gpt) is None
    assert TASKS["roberta"].decoder_num_layers(gpt) is None
    assert TASKS["t5"].total_num_layers(t5) == 4 and TASKS["t5"].decoder_num_layers(t5) == 2
    assert TASKS["gpt"].tokens_per_sample(gpt) == 64
    assert TASKS["t5"].tokens_per_sample(t5) == 64 + 16


def test_dataset_kwargs_come_from_the_config():
    config = MegatronLSHConfig()
    config.data.mask_prob, config.model.decoder_seq_length = 0.2, 24
    assert TASKS["gpt"].dataset_kwargs(config) == {}
    assert TASKS["roberta"].dataset_kwargs(config) == {"mask_prob": 0.2}
    assert TASKS["t5"].dataset_kwargs(config) == {"decoder_seq_length": 24}
    assert not DATASET_KINDS["gpt"].needs_special_tokens
    assert DATASET_KINDS["mlm"].needs_special_tokens and DATASET_KINDS["t5"].needs_special_tokens


SYNTHETIC_SHA256 = {"gpt": "f748c61d8d0d75a9", "roberta": "3cc497ded48d3348",
                    "t5": "1c7a165342642f91"}


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_batches_are_pinned(kind):
    config = get_recipe(f"tiny-{kind}-moe").model()
    batch = synthetic_batch(kind, config, 2, 5)
    digest = hashlib.sha256()
    for key, value in batch.items():
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.numpy().tobytes())
    assert digest.hexdigest()[:16] == SYNTHETIC_SHA256[kind]
    again = TASKS[kind].synthetic_batch(config, 2, seed=5)
    assert list(again) == list(batch) and all(torch.equal(again[k], batch[k]) for k in batch)
    with pytest.raises(ValueError, match="model kind must be one of"):
        synthetic_batch("bert", config, 2, 5)


def test_seed_scheme_is_pinned():
    assert {p.name: int(p) for p in SeedPart} == {
        "LAYER": 0, "MOE": 1, "FINAL_LAYERNORM": 7, "EMBEDDING": 17, "OUTPUT": 29,
        "MLM_HEAD": 31, "SHARED_EXPERT": 37, "CLASSIFICATION_HEAD": 41,
        "PATCH_MERGING": 43}
    assert layer_seed(1234, 3, SeedPart.MOE) == 1234004006
    assert layer_seed(1234, 0, SeedPart.MLM_HEAD) == 1234003733
    assert layer_seed(1234, 5) == layer_seed(1234, 5, SeedPart.LAYER)
    assert type(layer_seed(1234, 5, SeedPart.MOE)) is int
    assert type(1234 + SeedPart.EMBEDDING) is int
    assert mix_seed(1234, 1) == 1872555969794906654
    assert mix_seed(7) == 6787151260645162866
    assert mix_seed(2 ** 70, -3) == 1450030453650156136


KIND_FREE = ("megatron_lsh/training/loop.py", "megatron_lsh/training/data.py",
             "megatron_lsh/data/builder.py")


@pytest.mark.parametrize("path", KIND_FREE)
def test_no_kind_names_in_the_loop_and_data_code(path):
    """Kind names may appear in docstrings, never as values the code compares or looks up."""
    tree = ast.parse((REPO / path).read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    names = {*KINDS, "mlm"}
    found = [f"{path}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and node.value in names
             and id(node) not in docstrings]
    assert not found, "kind names in code that should ask the task:\n" + "\n".join(found)
