"""GLUE fine-tuning pieces in one process: sample encoding, evaluation padding, the
classifier's pooling and losses, the results table, and master weights after a weight load."""
from __future__ import annotations

import pytest
import torch

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig, OptimizerConfig
from megatron_lsh.finetune.data import GlueData, SplitDataset, encode_split
from megatron_lsh.glue.data import Example, get_task
from megatron_lsh.models.classification import GPTClassifier, classification_loss, pool
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.tokenizer.base import NullTokenizer

TINY = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                   seq_length=16, max_position_embeddings=16, vocab_size=64,
                   hidden_dropout=0.0, attention_dropout=0.0)
MOE = MoEConfig(num_experts=2, moe_layer_freq=2, router_topk=1)


def test_pair_is_both_texts_each_ended_by_eod_and_padded():
    tok = NullTokenizer(64)
    task = get_task("RTE")
    split = encode_split(task, "dev", [Example(("1 2 3", "4 5"), 0, "0")], tok, 10)
    assert split.tokens[0, :7].tolist() == [1, 2, 3, tok.eod, 4, 5, tok.eod]
    assert split.padding_mask[0].tolist() == [True] * 7 + [False] * 3
    assert split.truncated == 0 and split.labels.tolist() == [0]


def test_truncation_cuts_the_longer_text_and_keeps_the_final_eod():
    tok = NullTokenizer(64)
    task = get_task("RTE")
    split = encode_split(task, "dev", [Example(("1 2 3 4 5 6 7 8", "9 10"), 1, "0")], tok, 8)
    assert split.tokens[0].tolist() == [1, 2, 3, 4, tok.eod, 9, 10, tok.eod]
    assert split.truncated == 1


def test_regression_labels_are_float_and_a_too_short_sequence_is_refused():
    tok = NullTokenizer(64)
    split = encode_split(get_task("STS-B"), "dev", [Example(("1", "2"), 3.2, "0")], tok, 8)
    assert split.labels.dtype == torch.float32 and split.labels.tolist() == [pytest.approx(3.2)]
    with pytest.raises(ConfigError, match="too short"):
        encode_split(get_task("STS-B"), "dev", [Example(("1", "2"), 3.2, "0")], tok, 3)


def test_evaluation_covers_every_example_once_across_dp_ranks():
    tok = NullTokenizer(64)
    task = get_task("SST-2")
    examples = [Example((f"{i % 50 + 1}",), i % 2, str(i)) for i in range(23)]
    split = encode_split(task, "dev", examples, tok, 4)
    seen = []
    for rank in range(2):
        data = GlueData(task, {"train": split, "dev": split}, global_batch_size=8,
                        micro_batch_size=2, dp_rank=rank, dp_size=2, seed=1)
        batches, iterator = data.eval_batches(split)
        assert batches == 3   # 23 examples in whole global batches of 8
        for _ in range(batches * 2):   # 2 micro-batches of this rank per global batch
            batch = next(iterator)
            real = batch["sample"] >= 0
            assert (batch["loss_mask"] == real.float()).all()
            seen += batch["sample"][real].tolist()
    assert sorted(seen) == list(range(23))
    assert len(SplitDataset(split, 24)) == 24


def test_train_epochs_are_whole_steps_of_fresh_permutations():
    tok = NullTokenizer(64)
    task = get_task("SST-2")
    split = encode_split(task, "train", [Example((f"{i + 1}",), 0, str(i)) for i in range(20)],
                         tok, 4)
    data = GlueData(task, {"train": split, "dev": split}, global_batch_size=8,
                    micro_batch_size=8, dp_rank=0, dp_size=1, seed=3)
    assert data.steps_per_epoch == 2
    it = data.train_iterator(0)
    epochs = [[next(it)["sample"].tolist() for _ in range(2)] for _ in range(2)]
    first, second = (sum(e, []) for e in epochs)
    assert len(set(first)) == 16 and len(set(second)) == 16 and first != second
    resumed = data.train_iterator(24)   # three steps in: the second epoch's second step
    assert next(resumed)["sample"].tolist() == epochs[1][1]


def test_pooling_last_reads_the_last_real_token_and_mean_averages_real_tokens():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(3, 2, 4)   # [s, b, h]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(pool(x, mask, "last"), torch.stack([x[1, 0], x[2, 1]]))
    assert torch.allclose(pool(x, mask, "mean"),
                          torch.stack([x[:2, 0].mean(0), x[:, 1].mean(0)]))


def test_right_padding_does_not_change_the_classifier_output():
    torch.manual_seed(0)
    model = GPTClassifier(TINY, MOE, ProcessGroups.single(), seed=5, num_classes=3).eval()
    tokens = torch.randint(0, 64, (1, 16))
    short = torch.arange(16).unsqueeze(0) < 9
    other = torch.where(short, tokens, torch.randint(0, 64, (1, 16)))  # different padding ids
    a, _ = model(input_ids=tokens, padding_mask=short)
    b, _ = model(input_ids=other, padding_mask=short)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (1, 3) and a.dtype == torch.float32


def test_classification_and_regression_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    torch.testing.assert_close(classification_loss(logits, torch.tensor([0, 0]), False), expected)
    scores = torch.tensor([[1.5], [4.0]])
    torch.testing.assert_close(classification_loss(scores, torch.tensor([1.0, 5.0]), True),
                               torch.tensor([0.25, 1.0]))


def test_an_unknown_pooling_is_one_sentence():
    with pytest.raises(ConfigError, match="--classifier-pooling must be one of last, mean"):
        GPTClassifier(TINY, MOE, ProcessGroups.single(), pooling="first")


def test_results_table_marks_the_best_epoch():
    from megatron_lsh.finetune.report import markdown_table
    task = get_task("MRPC")
    history = [{"epoch": e, "iteration": 10 * e,
                "splits": {"dev": {"loss": 0.5 / e, "f1": f, "accuracy": a}}}
               for e, f, a in ((1, 0.7, 0.6), (2, 0.8, 0.7))]
    text = markdown_table({"task": "MRPC", "a2a_compression": "lsh", "history": history,
                           "best_epoch": 2, "main_metric": "f1", "dev": {"f1": 0.8},
                           "epochs_run": 2, "stopped_early": False}, task)
    assert "| 2 (best) | 20 | 0.2500 | 0.8000 | 0.7000 |" in text
    assert "| 1 | 10 | 0.5000 | 0.7000 | 0.6000 |" in text
    assert "Best epoch by dev f1: 2 (0.8000)" in text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reload_model_params_makes_the_next_step_start_from_loaded_weights(dtype):
    """A weight-only load (--finetune, a pretrained body) must reach the fp32 masters: else
    the first step writes the masters' old values back into the model. The step after the
    load must equal the step of an optimizer built on the loaded weights."""
    from megatron_lsh.parallel.optimizer import MixedPrecisionOptimizer
    config = OptimizerConfig(lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    loaded = torch.nn.Linear(4, 4).to(dtype)
    reference = MixedPrecisionOptimizer(loaded, config, ProcessGroups.single())
    model = torch.nn.Linear(4, 4).to(dtype)   # other initial weights
    opt = MixedPrecisionOptimizer(model, config, ProcessGroups.single())
    model.load_state_dict(loaded.state_dict())
    opt.reload_model_params()
    x = torch.randn(2, 4).to(dtype)
    for m, o in ((loaded, reference), (model, opt)):
        m(x).float().square().sum().backward()
        o.step()
    torch.testing.assert_close(model.weight.detach(), loaded.weight.detach(), rtol=0, atol=0)
    if dtype == torch.bfloat16:   # without the reload the old masters come back
        stale = torch.nn.Linear(4, 4).to(dtype)
        stale_opt = MixedPrecisionOptimizer(stale, config, ProcessGroups.single())
        stale.load_state_dict(loaded.state_dict())
        stale(x).float().square().sum().backward()
        stale_opt.step()
        assert not torch.equal(stale.weight.detach(), loaded.weight.detach())
