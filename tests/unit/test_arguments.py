"""Megatron flags -> typed config: names, meanings, precedence and one-sentence errors."""
import pytest

from megatron_lsh.arguments import build_parser, parse_args, parse_args_with_namespace
from megatron_lsh.config import MegatronLSHConfig


def test_no_flags_gives_the_dataclass_defaults():
    assert parse_args([]) == MegatronLSHConfig()


def test_flags_land_in_their_config_fields():
    c = parse_args([
        "--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
        "--ffn-hidden-size", "3072", "--seq-length", "512", "--max-position-embeddings", "514",
        "--decoder-num-layers", "6", "--decoder-seq-length", "128", "--kv-channels", "32",
        "--make-vocab-size-divisible-by", "64", "--hidden-dropout", "0.0",
        "--attention-dropout", "0.05", "--init-method-std", "0.01", "--layernorm-epsilon", "1e-6",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--swiglu",
        "--recompute-granularity", "selective",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--expert-model-parallel-size", "4", "--sequence-parallel", "--distributed-backend", "gloo",
        "--distributed-timeout-minutes", "3", "--use-distributed-optimizer",
        "--num-experts", "16", "--moe-layer-freq", "1", "--moe-router-topk", "1",
        "--moe-expert-capacity-factor", "1.25", "--moe-aux-loss-coeff", "0.02",
        "--moe-z-loss-coeff", "0.001", "--moe-a2a-compression", "lsh", "--moe-lsh-num-hashes", "8",
        "--moe-lsh-hash-type", "spherical_plane", "--moe-lsh-rotation-dim", "3",
        "--moe-lsh-no-compensation", "--moe-lsh-redraw-interval", "50",
        "--micro-batch-size", "4", "--global-batch-size", "64", "--train-iters", "1000",
        "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "linear", "--lr-decay-iters", "900",
        "--lr-warmup-fraction", "0.01", "--weight-decay", "0.1", "--clip-grad", "0.5",
        "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6", "--fp16",
        "--initial-loss-scale", "65536", "--min-loss-scale", "2", "--loss-scale-window", "500",
        "--hysteresis", "3", "--seed", "7",
        "--data-path", "0.3", "a_text_document", "0.7", "b_text_document", "--split", "98,2,0",
        "--data-cache-path", "/tmp/cache", "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", "v.json", "--merge-file", "m.txt", "--vocab-extra-ids", "100",
        "--mask-prob", "0.2", "--num-workers", "1",
        "--save", "ck", "--load", "ck", "--save-interval", "100", "--eval-interval", "200",
        "--eval-iters", "5", "--log-interval", "1", "--tensorboard-dir", "tb",
        "--exit-signal-handler", "--exit-interval", "300", "--exit-duration-in-mins", "30.5",
        "--finetune", "--no-load-optim", "--no-load-rng", "--metrics-jsonl", "m.jsonl",
    ])
    m = c.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (12, 768, 12, 3072)
    assert (m.seq_length, m.max_position_embeddings, m.decoder_num_layers, m.decoder_seq_length) == (512, 514, 6, 128)
    assert (m.kv_channels, m.make_vocab_size_divisible_by) == (32, 64)
    assert (m.hidden_dropout, m.attention_dropout, m.init_method_std, m.layernorm_epsilon) == (0.0, 0.05, 0.01, 1e-6)
    assert m.add_bias_linear is False and m.untie_embeddings_and_output_weights is True
    assert m.activation == "swiglu" and m.recompute_granularity == "selective"
    p = c.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size) == (2, 2, 4)
    assert p.sequence_parallel and p.use_distributed_optimizer
    assert (p.distributed_backend, p.distributed_timeout_minutes) == ("gloo", 3)
    e = c.moe
    assert (e.num_experts, e.moe_layer_freq, e.router_topk, e.capacity_factor) == (16, 1, 1, 1.25)
    assert (e.aux_loss_coeff, e.z_loss_coeff, e.a2a_compression) == (0.02, 0.001, "lsh")
    lsh = e.compression_options
    assert (lsh.num_hashes, lsh.hash_type, lsh.rotation_dim) == (8, "spherical_plane", 3)
    assert (lsh.compensation, lsh.redraw_interval) == ("none", 50)  # --moe-lsh-no-compensation
    o = c.optimizer
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_decay_iters, o.lr_warmup_fraction) == (3e-4, 3e-5, "linear", 900, 0.01)
    assert (o.weight_decay, o.clip_grad, o.adam_beta1, o.adam_beta2, o.adam_eps) == (0.1, 0.5, 0.8, 0.95, 1e-6)
    assert o.fp16 and not o.bf16
    assert (o.initial_loss_scale, o.min_loss_scale, o.loss_scale_window, o.hysteresis) == (65536.0, 2.0, 500, 3)
    t = c.training
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.seed) == (4, 64, 1000, 7)
    assert (t.eval_interval, t.eval_iters, t.exit_interval, t.exit_duration_in_mins) == (200, 5, 300, 30.5)
    assert t.exit_signal_handler
    d = c.data
    assert d.data_path == ["0.3", "a_text_document", "0.7", "b_text_document"]
    assert (d.split, d.data_cache_path, d.tokenizer_type) == ("98,2,0", "/tmp/cache", "GPT2BPETokenizer")
    assert (d.vocab_file, d.merge_file, d.vocab_extra_ids, d.mask_prob, d.num_workers) == ("v.json", "m.txt", 100, 0.2, 1)
    k = c.checkpoint
    assert (k.save, k.load, k.save_interval, k.finetune, k.no_load_optim, k.no_load_rng) == ("ck", "ck", 100, True, True, True)
    g = c.logging
    assert (g.log_interval, g.tensorboard_dir, g.metrics_jsonl) == (1, "tb", "m.jsonl")


def test_cast_options_come_from_the_cast_compressor():
    c = parse_args(["--moe-a2a-compression", "cast", "--moe-cast-dtype", "fp8"])
    assert c.moe.compression_options.dtype == "fp8"
    assert parse_args(["--moe-a2a-compression", "cast"]).moe.compression_options is None


def test_lsh_rate_quality_options():
    c = parse_args(["--moe-a2a-compression", "lsh", "--moe-lsh-compensation", "scaled",
                    "--moe-lsh-target-rate", "0.1", "--moe-lsh-num-hashes", "0",
                    "--moe-lsh-wire-dtype", "fp8", "--moe-a2a-compression-scope", "inter-node"])
    o = c.moe.compression_options
    assert (o.compensation, o.target_rate, o.num_hashes) == ("scaled", 0.1, 0)
    assert (o.wire_dtype, o.scope) == ("fp8", "inter-node")


@pytest.mark.parametrize("argv, message", [
    (["--moe-lsh-num-hashes", "0"], "--moe-lsh-num-hashes must be positive, got 0"),
    (["--moe-lsh-target-rate", "1.5"], "--moe-lsh-target-rate must be in (0, 1], got 1.5"),
])
def test_bad_lsh_options_name_their_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--moe-a2a-compression", "lsh", *argv])
    assert message in capsys.readouterr().err


def test_options_of_another_compressor_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--moe-a2a-compression", "none", "--moe-lsh-num-hashes", "4"])
    assert ("--moe-lsh-num-hashes is an option of the 'lsh' compressor, but "
            "--moe-a2a-compression is 'none'") in capsys.readouterr().err


def test_every_config_field_with_a_flag_is_on_the_parser():
    """The parser is derived from the dataclasses: each declared flag is there, once."""
    import dataclasses
    from megatron_lsh.config import SECTIONS
    from megatron_lsh.moe.compressors import compressor_classes
    parser = build_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    classes = list(SECTIONS.values()) + [c.Options for c in compressor_classes().values()]
    declared = [f.metadata["flag"] for cls in classes for f in dataclasses.fields(cls)
                if f.metadata.get("flag")]
    assert len(declared) == len(set(declared)) and set(declared) <= options


def test_base_configs_sit_between_dataclass_and_command_line():
    from megatron_lsh.config import ModelConfig, OptimizerConfig
    base = {"model": ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12,
                                 activation="swiglu", init_method_std=0.006),
            "optimizer": OptimizerConfig(lr=3e-4)}
    c = parse_args(["--hidden-size", "384"], base=base)
    assert (c.model.num_layers, c.model.hidden_size, c.model.activation) == (12, 384, "swiglu")
    assert c.model.init_method_std == 0.006    # a field no flag mapping lists is kept too
    # Derived defaults follow the override: SwiGLU's is Megatron's 4h * 2/3, rounded down to
    # a multiple of 64 (1024 for h = 384).
    assert c.model.ffn_hidden_size == 1024
    assert c.optimizer.lr == 3e-4 and c.optimizer.bf16 is False


def test_unknown_base_section_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([], base={"modle": None})
    assert exit_info.value.code == 2
    assert "base config has unknown sections: modle" in capsys.readouterr().err


def test_extra_args_provider_values_come_back_in_the_namespace():
    def extra(parser):
        parser.add_argument("--my-flag", type=int, default=5)
        return parser
    config, namespace = parse_args_with_namespace(["--num-layers", "4"], extra_args_provider=extra)
    assert config.model.num_layers == 4 and namespace.my_flag == 5


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "0"], "--num-layers must be positive, got 0"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 cannot both be set"),
    (["--lr", "0.01", "--min-lr", "0.1"], "--min-lr (0.1) exceeds --lr (0.01)"),
    (["--hidden-size", "65"], "--hidden-size (65) is not divisible by --num-attention-heads (4)"),
    (["--num-experts", "2", "--moe-router-topk", "3"], "--moe-router-topk (3) exceeds --num-experts (2)"),
    (["--lr-warmup-iters", "5", "--lr-warmup-fraction", "0.1"],
     "--lr-warmup-iters and --lr-warmup-fraction cannot both be set"),
    (["--train-iters", "10", "--lr-warmup-iters", "10"],
     "the learning-rate warmup (10 iterations) must end before --lr-decay-iters / --train-iters (10)"),
    (["--global-batch-size", "5", "--micro-batch-size", "2"],
     "--global-batch-size (5) is not divisible by --micro-batch-size (2)"),
    (["--data-path", "a", "0.5", "b"],
     "--data-path must be prefixes only ('P1 P2 ...', blended by size)"),
    (["--data-path", "0.5", "a", "b"], "--data-path must alternate weights and prefixes"),
    (["--data-path", "-1", "a"], "--data-path weights must be non-negative with a positive sum"),
    (["--split", "1,x"], "--split must be up to three non-negative weights"),
    (["--exit-interval", "0"], "--exit-interval must be positive, got 0"),
    (["--moe-a2a-compression", "zip"], "argument --moe-a2a-compression: invalid choice: 'zip'"),
    (["--num-layers", "two"],
     "argument --num-layers/--encoder-num-layers: invalid int value: 'two'"),
])
def test_bad_values_end_in_one_sentence_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 2  # the short usage line and the error


def test_help_documents_every_flag_with_one_line():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help"
            assert "\n" not in action.help
            assert action.option_strings[0] in text
    assert "(default: 1234)" in text  # --seed shows the dataclass default
