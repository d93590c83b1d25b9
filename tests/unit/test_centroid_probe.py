"""bench/centroid_probe.py: its MoE forward is the layer's, and its errors vanish at rate 1."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_lsh.models import build_model, get_recipe
from megatron_lsh.models.synthetic import synthetic_batch
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.random import model_parallel_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import centroid_probe  # noqa: E402


@pytest.fixture(scope="module")
def model_and_batches():
    torch.set_num_threads(1)
    recipe = get_recipe("tiny-roberta-moe")
    config = recipe.model()
    model_parallel_seed(3, ProcessGroups.single())
    model = build_model("roberta", config, recipe.moe(), seed=3).eval()
    batches = []
    for seed in (0, 1):
        b = synthetic_batch("roberta", config, 4, seed)
        pad = torch.zeros_like(b["padding_mask"])
        pad[:, -3:] = True                      # a few padded positions per sample
        batches.append({"tokens": b["input_ids"], "labels": b["labels"],
                        "padding_mask": (b["padding_mask"] & ~pad).long(),
                        "loss_mask": b["loss_mask"] * (~pad).float()})
    return model, batches


def _own_loss_and_grads(model, batches):
    """The model's own forward (the library's MoE layer), as the probe weighs the loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        per_token, _ = model(input_ids=b["tokens"], padding_mask=b["padding_mask"].bool(),
                             labels=b["labels"])
        loss = (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
        loss.backward()
        total += float(loss.detach())
    return total / len(batches), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def test_exact_setting_is_the_library_layer(model_and_batches):
    model, batches = model_and_batches
    want_loss, want = _own_loss_and_grads(model, batches)
    got_loss, got = centroid_probe.loss_and_grads(model, batches, 0, {"rate": None}, [])
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_rate_one_has_no_error_and_lower_rates_do(model_and_batches):
    model, batches = model_and_batches
    rows = centroid_probe.probe(model, batches, 0, [{"rate": 1.0}, {"rate": 0.1, "alpha": 1.0}])
    exact, full, low = rows
    assert exact["rate"] is None and full["clusters_per_row"] == 1.0
    assert full["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    assert max(full["grad_rel_err"].values()) < 1e-4
    assert all(c["x_var"] == 0.0 for c in full["by_class"].values())
    assert set(low["by_class"]) == {"other", "mask", "pad"}
    assert 0.1 <= low["clusters_per_row"] < 0.2
    assert low["by_class"]["other"]["x_var"] > 0 and low["grad_rel_err"]["experts"] > 1e-3


def test_param_groups():
    assert centroid_probe.param_group("encoder.layers.2.mlp.experts.fc1_weight") == "experts"
    assert centroid_probe.param_group("encoder.layers.2.mlp.router.weight") == "router"
    assert centroid_probe.param_group("encoder.layers.3.attention.qkv.weight") == "layer3"
    assert centroid_probe.param_group("embedding.word_embeddings.weight") == "embed"
    assert centroid_probe.param_group("head.dense.weight") == "head"
