"""Megatron-LM's own example launch scripts parse here, flags kept (sizes shrunk, paths dummy).

The flag sets below are those of five scripts in NVIDIA/Megatron-LM's ``examples/`` (GPT-3
175B, BERT 340M, T5 220M, Llama-3 8B fp8, Mixtral 8x7B), with model sizes shrunk and paths
replaced. For every flag of them one of three things holds, and this test keeps the list:
it is a setting here (and the parsed config carries the script's value), it is accepted as a
no-op that describes what this project does (``megatron_lsh.compat.ACCEPTED``), or it is
refused with one sentence (``REFUSED``, and the values ``REFUSED_VALUES`` names). The
refused flags of each script are listed in ``REFUSED_BY_SCRIPT``; without them every
script parses.
"""
from __future__ import annotations

import pytest

from megatron_lsh.arguments import build_parser, config_from_namespace, parse_args_with_namespace
from megatron_lsh.compat import ACCEPTED, REFUSED, REFUSED_VALUES
from megatron_lsh.config import ConfigError
from megatron_lsh.training.entry import _recipe_flag, base_for, main

GPT3 = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --attention-backend auto "
        "--micro-batch-size 1 --global-batch-size 16 --rampup-batch-size 4 4 64 "
        "--train-iters 50 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 "
        "--init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine "
        "--min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 43 "
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
        "--data-path /data/gpt_text_document --vocab-file /data/gpt2-vocab.json "
        "--merge-file /data/gpt2-merges.txt --split 949,50,1 "
        "--log-interval 100 --save-interval 10000 --eval-interval 1000 --save /ckpt "
        "--load /ckpt --eval-iters 10 --tensorboard-dir /tb")
BERT = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --attention-backend auto "
        "--micro-batch-size 4 --global-batch-size 32 --train-iters 1000 --weight-decay 1e-2 "
        "--clip-grad 1.0 --fp16 --lr 0.0001 --lr-decay-iters 990 --lr-decay-style linear "
        "--min-lr 1.0e-5 --weight-decay 1e-2 --lr-warmup-fraction .01 --clip-grad 1.0 "
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
        "--data-path /data/bert_text_document --vocab-file /data/bert-vocab.txt "
        "--split 949,50,1 --log-interval 100 --save-interval 10000 --eval-interval 1000 "
        "--save /ckpt --load /ckpt --eval-iters 10 --tensorboard-dir /tb")
T5 = ("--encoder-num-layers 2 --decoder-num-layers 2 --hidden-size 64 --num-attention-heads 4 "
      "--kv-channels 16 --ffn-hidden-size 128 --encoder-seq-length 64 --decoder-seq-length 16 "
      "--max-position-embeddings 64 --micro-batch-size 4 --global-batch-size 16 --lr 0.0001 "
      "--train-iters 1000 --lr-decay-iters 1000 --lr-decay-style linear --min-lr 0.00001 "
      "--weight-decay 1e-2 --lr-warmup-fraction .01 --clip-grad 1.0 --bf16 "
      "--vocab-extra-ids 100 --init-method-std 0.015 --transformer-impl transformer_engine "
      "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
      "--attention-backend auto --data-path /data/t5_text_sentence "
      "--vocab-file /data/bert-large-cased-vocab.txt --tokenizer-type BertWordPieceCase "
      "--split 99982,9,9 --log-interval 100 --tensorboard-dir /tb --save-interval 500 "
      "--eval-interval 1000 --eval-iters 10 --distributed-backend nccl --save /ckpt "
      "--load /ckpt")
LLAMA3 = ("--use-mcore-models --num-layers 2 --hidden-size 64 --ffn-hidden-size 224 "
          "--num-attention-heads 4 --group-query-attention --num-query-groups 2 "
          "--kv-channels 16 --seq-length 64 --max-position-embeddings 64 "
          "--position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 "
          "--attention-dropout 0.0 --hidden-dropout 0.0 --swiglu --init-method-std 0.0134 "
          "--attention-backend fused --apply-layernorm-1p "
          "--untie-embeddings-and-output-weights --disable-bias-linear "
          "--micro-batch-size 1 --global-batch-size 8 --train-samples 800 "
          "--lr-decay-samples 792 --lr-warmup-samples 16 --lr 0.00015 --min-lr 0.00001 "
          "--decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine "
          "--clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 "
          "--grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss "
          "--manual-gc --empty-unused-memory-level 1 --exit-duration-in-mins 235 "
          "--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max "
          "--fp8-param-gather --tensor-model-parallel-size 1 --context-parallel-size 1 "
          "--sequence-parallel --use-distributed-optimizer --overlap-grad-reduce "
          "--overlap-param-gather --mock-data --tokenizer-type NullTokenizer "
          "--vocab-size 1024 --data-cache-path /tmp/cache --tiktoken-pattern v2 "
          "--split '99,1,0' --no-create-attention-mask-in-dataloader --no-mmap-bin-files "
          "--num-workers 1 --log-interval 1 --eval-iters 32 --eval-interval 100 "
          "--save-interval 1000 --log-throughput --profile --profile-step-start 4 "
          "--profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60 "
          "--save /ckpt --load /ckpt --tensorboard-dir /tb")
MIXTRAL = ("--use-mcore-models --disable-bias-linear --seq-length 32 "
           "--max-position-embeddings 64 --num-layers 2 --hidden-size 64 --ffn-hidden-size 112 "
           "--num-attention-heads 4 --init-method-std 0.01 --attention-dropout 0.0 "
           "--hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope "
           "--swiglu --untie-embeddings-and-output-weights --group-query-attention "
           "--num-query-groups 2 --no-masked-softmax-fusion --no-position-embedding "
           "--rotary-base 1000000 --num-experts 4 --moe-router-topk 2 "
           "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
           "--moe-grouped-gemm --moe-token-dispatcher-type alltoall --overlap-param-gather "
           "--overlap-grad-reduce --tokenizer-type Llama2Tokenizer "
           "--tokenizer-model /data/tokenizer.model --mock-data --split 99990,8,2 "
           "--micro-batch-size 1 --global-batch-size 4 --lr 1e-4 --train-iters 7 "
           "--min-lr 1.0e-5 --weight-decay 0.1 --clip-grad 1.0 "
           "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
           "--expert-model-parallel-size 2 --use-distributed-optimizer --sequence-parallel "
           "--eval-iters 10 --no-load-optim --no-load-rng")

SCRIPTS = {"gpt3_175b": GPT3, "bert_340m": BERT, "t5_220m": T5, "llama3_8b_fp8": LLAMA3,
           "mixtral_8x7b": MIXTRAL}

REFUSED_BY_SCRIPT = {
    "gpt3_175b": {"--rampup-batch-size": 3},
    "bert_340m": {},
    "t5_220m": {},
    "llama3_8b_fp8": {"--apply-layernorm-1p": 0, "--decoupled-lr": 1, "--decoupled-min-lr": 1,
                      "--grad-reduce-in-bf16": 0, "--calculate-per-token-loss": 0,
                      "--fp8-format": 1, "--fp8-amax-history-len": 1,
                      "--fp8-amax-compute-algo": 1, "--fp8-param-gather": 0, "--profile": 0,
                      "--profile-step-start": 1, "--profile-step-end": 1, "--ckpt-format": 1},
    "mixtral_8x7b": {},
}
"""Flags (with how many values follow) each script gives that are refused here."""


def tokens(script: str) -> list:
    """The script's flags as a launcher passes them (quotes kept, as the array expansion of
    Megatron's Llama script leaves them in ``--split '99,1,0'``)."""
    return script.split()


def without(argv: list, flag: str, nvalues: int) -> list:
    """``argv`` without ``flag`` and the values that follow it."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + nvalues:]


def parse(argv: list):
    return parse_args_with_namespace(argv, lambda ns: base_for(ns, "tiny-gpt-moe"),
                                     extra_args_provider=_recipe_flag)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_parses_without_its_refused_flags(name):
    argv = tokens(SCRIPTS[name])
    for flag, nvalues in REFUSED_BY_SCRIPT[name].items():
        argv = without(argv, flag, nvalues)
    config, namespace = parse(argv)
    for flag in namespace.compat_accepted:
        assert flag in ACCEPTED
    assert config.model.hidden_size == 64   # the script's model, not a recipe's


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_refused_flag_is_one_sentence(name, capsys):
    argv = tokens(SCRIPTS[name])
    refused = REFUSED_BY_SCRIPT[name]
    for flag, nvalues in refused.items():
        others = argv
        for other, n in refused.items():
            if other != flag:
                others = without(others, other, n)
        with pytest.raises(SystemExit) as exit_info:
            parse(others)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: {flag}" in message, message
        if flag in REFUSED:
            assert REFUSED[flag].reason in message, message
        else:   # a refused value of an accepted flag
            assert REFUSED_VALUES[flag] in message, message


def test_every_flag_of_the_scripts_is_known():
    """Each flag is a setting, an accepted no-op or a refused one (argparse would say
    'unrecognized arguments' otherwise, which the tests above would show as a failure)."""
    parser = build_parser(_recipe_flag)
    known = set(parser._option_string_actions)
    for name, script in SCRIPTS.items():
        for token in tokens(script):
            if token.startswith("--"):
                assert token in known, (name, token)


def test_parsed_values_are_the_scripts():
    llama, _ = parse(_strip(LLAMA3, "llama3_8b_fp8"))
    m, o, t, d = llama.model, llama.optimizer, llama.training, llama.data
    assert (m.num_query_groups, m.position_embedding_type, m.rotary_base) == (2, "rope", 1000000)
    assert (m.activation, m.ffn_hidden_size, m.add_bias_linear) == ("swiglu", 224, False)
    assert (t.train_samples, o.lr_warmup_samples, o.lr_decay_samples) == (800, 16, 792)
    assert d.split == "99,1,0" and d.mock_data and d.tokenizer_type == "NullTokenizer"
    resolved = llama.resolved_for_batch(8)
    assert resolved.training.train_iters == 100
    assert resolved.optimizer.lr_warmup_iters == 2 and resolved.optimizer.lr_decay_iters == 99
    mixtral, _ = parse(_strip(MIXTRAL, "mixtral_8x7b"))
    assert (mixtral.model.normalization, mixtral.model.position_embedding_type) == ("RMSNorm",
                                                                                   "rope")
    assert (mixtral.moe.num_experts, mixtral.moe.moe_layer_freq) == (4, 1)
    assert mixtral.moe.load_balancing_type == "aux_loss" and mixtral.moe.aux_loss_coeff == 1e-2
    t5, _ = parse(_strip(T5, "t5_220m"))
    assert (t5.model.num_layers, t5.model.seq_length, t5.model.decoder_seq_length) == (2, 64, 16)
    assert t5.data.tokenizer_type == "BertWordPieceCase"


def _strip(script: str, name: str) -> list:
    argv = tokens(script)
    for flag, nvalues in REFUSED_BY_SCRIPT[name].items():
        argv = without(argv, flag, nvalues)
    return argv


def test_model_flags_without_a_recipe_are_the_whole_model():
    config, _ = parse(_strip(GPT3, "gpt3_175b"))
    # Megatron's defaults, not the tiny recipe's: dense, dropout 0.1, GPT-2's vocabulary.
    assert config.moe.num_experts == 0
    assert (config.model.hidden_dropout, config.model.vocab_size) == (0.1, 50257)
    assert config.model.num_layers == 4


def test_missing_model_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        parse(["--hidden-size", "64", "--num-attention-heads", "4"])
    err = capsys.readouterr().err
    assert ("without --model-recipe the model is defined by its flags alone, and --num-layers, "
            "--seq-length are missing") in err


def test_no_model_flags_use_the_default_recipe_and_say_so(capsys):
    config, _ = parse(["--train-iters", "5"])
    assert "using the tiny-gpt-moe recipe" in capsys.readouterr().out
    assert config.moe.num_experts == 4


def test_a_recipe_follows_a_num_layers_override():
    config, _ = parse(["--model-recipe", "tiny-gpt-moe", "--num-layers", "6"])
    assert config.moe.moe_layer_freq == [0, 1, 0, 1, 0, 1]
    config, _ = parse(["--model-recipe", "tiny-gpt-moe", "--num-layers", "6",
                       "--moe-layer-freq", "3"])
    assert config.moe.moe_layer_freq == 3


def test_unknown_recipe_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("gpt", "tiny-gpt-moe", ["--model-recipe", "nope"])
    assert exit_info.value.code == 2
    assert "error: unknown recipe 'nope'; known: " in capsys.readouterr().err


@pytest.mark.parametrize("argv, text", [
    (["--context-parallel-size", "2"], "context parallelism is not supported"),
    (["--moe-token-dispatcher-type", "allgather"], "always travel by all-to-all"),
    (["--ckpt-format", "torch_dist"], "use --ckpt-format torch"),
])
def test_refused_values_of_accepted_flags(argv, text):
    with pytest.raises(ConfigError, match=text):
        config_from_namespace(build_parser().parse_args(argv))


def test_the_docs_list_is_the_modules():
    from pathlib import Path

    from megatron_lsh.compat import markdown_table
    doc = (Path(__file__).resolve().parents[2] / "docs" / "MEGATRON.md").read_text()
    assert doc.rstrip().endswith(markdown_table()), "regenerate: python -m megatron_lsh.compat"
