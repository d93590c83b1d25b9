"""ParallelDims: the rank grid, the group slices and the one-sentence layout errors."""
import pytest

from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig, OptimizerConfig
from megatron_lsh.moe.compressors import build_compressor
from megatron_lsh.moe.compressors.cast import CastOptions
from megatron_lsh.moe.compressors.lsh import LSHOptions
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups


def test_grid_slices_cover_every_rank_once_per_kind():
    dims = ParallelDims(8, tp=2, pp=2, ep=2)
    assert dims.dp == 2 and dims.expert_dp == 2
    for groups in (dims.tp_groups(), dims.pp_groups(), dims.dp_groups(), dims.ep_groups(),
                   dims.expert_dp_groups(), dims.model_parallel_groups()):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(8))
    assert dims.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert dims.embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.expert_dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_expert_groups_within_a_stage():
    dims = ParallelDims(8, tp=1, pp=2, ep=2)  # dp = 4 per stage
    assert dims.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.expert_dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.coordinates(6) == (1, 2, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, tp=4, pp=1),
     r"world size \(6\) is not divisible by tensor-model-parallel-size \(4\) x "
     r"pipeline-model-parallel-size \(1\)"),
    (dict(world_size=4, tp=2, pp=1, dp=3),
     r"world size \(4\) is not equal to tensor-model-parallel-size \(2\) x "
     r"pipeline-model-parallel-size \(1\) x data-parallel-size \(3\)"),
    (dict(world_size=4, tp=1, pp=2, ep=4),
     r"expert-model-parallel-size \(4\) does not divide data-parallel-size \(2\) x "
     r"tensor-model-parallel-size \(1\) = 2"),
])
def test_invalid_layouts_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims(**kwargs)


def test_invalid_model_splits_are_refused():
    dims = ParallelDims(4, tp=2, pp=2)
    with pytest.raises(ConfigError, match=r"num-attention-heads \(3\) is not divisible by "
                                          r"tensor-model-parallel-size \(2\)"):
        dims.check_model(num_layers=4, num_attention_heads=3)
    with pytest.raises(ConfigError, match=r"num-layers \(3\) is not divisible by "
                                          r"pipeline-model-parallel-size \(2\)"):
        dims.check_model(num_layers=3, num_attention_heads=4)
    dims = ParallelDims(4, ep=4)
    with pytest.raises(ConfigError, match=r"num-experts \(6\) is not divisible by "
                                          r"expert-model-parallel-size \(4\)"):
        dims.check_model(num_layers=2, num_attention_heads=4, num_experts=6)
    dims.check_model(num_layers=2, num_attention_heads=4, num_experts=8)


def test_batch_split():
    dims = ParallelDims(4, tp=1, pp=1)
    assert dims.check_batch(global_batch_size=16, micro_batch_size=2) == 2
    with pytest.raises(ConfigError, match=r"global-batch-size \(10\) is not divisible by "
                                          r"micro-batch-size \(2\) x data-parallel-size \(4\)"):
        dims.check_batch(global_batch_size=10, micro_batch_size=2)


def test_single_process_groups_need_no_distributed():
    groups = ProcessGroups.build(ParallelDims(1))
    assert groups.tp is None and groups.tp_size == 1 and groups.is_first_stage
    assert groups.is_last_stage and groups.ep_rank == 0
    with pytest.raises(ConfigError, match="needs 4 processes"):
        ProcessGroups.build(ParallelDims(4, tp=4))


def test_config_validation_messages():
    """Configs built in code are checked like flags, and messages name the flags."""
    with pytest.raises(ConfigError, match=r"--hidden-size \(10\) is not divisible by "
                                          r"--num-attention-heads \(4\)"):
        ModelConfig(hidden_size=10, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"--moe-router-topk \(3\) exceeds --num-experts \(2\)"):
        MoEConfig(num_experts=2, router_topk=3)
    with pytest.raises(ConfigError, match="--moe-a2a-compression must be one of"):
        build_compressor(MoEConfig(num_experts=2, a2a_compression="zip"), 8)
    with pytest.raises(ConfigError, match="--bf16 and --fp16 cannot both be set"):
        OptimizerConfig(bf16=True, fp16=True)
    with pytest.raises(ConfigError, match="--adam-eps must be positive"):
        OptimizerConfig(adam_eps=0.0)
    with pytest.raises(ConfigError, match="--moe-lsh-num-hashes must be positive, got 0"):
        LSHOptions(num_hashes=0)
    with pytest.raises(ConfigError, match="compressor 'lsh' takes LSHOptions"):
        build_compressor(MoEConfig(num_experts=2, a2a_compression="lsh",
                                   compression_options=CastOptions()), 8)
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4)
    assert cfg.ffn_hidden_size == 256 and cfg.kv_channels == 16
