"""The optimizer of a run: the replicated mixed-precision AdamW or the ZeRO-1 one.

A module of its own because it needs both: :mod:`~megatron_lsh.parallel.distributed_optimizer`
builds on :mod:`~megatron_lsh.parallel.optimizer` (its base class), so the choice between them
cannot live in either without an import circle.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch.nn as nn

from megatron_lsh.config import OptimizerConfig
from megatron_lsh.parallel.data_parallel import DistributedDataParallel
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.distributed_optimizer import DistributedOptimizer
from megatron_lsh.parallel.loss_scaler import (ConstantLossScaler, DynamicLossScaler, LossScaler,
                                               StaticLossScaler)
from megatron_lsh.parallel.optimizer import MixedPrecisionOptimizer


def build_loss_scaler(config: OptimizerConfig) -> LossScaler:
    """``--loss-scale`` when given (fp16 or bf16, static), else dynamic scaling for fp16 (the
    config's initial scale, window, hysteresis), else 1."""
    if config.loss_scale is not None and (config.fp16 or config.bf16):
        return StaticLossScaler(config.loss_scale)
    if config.fp16:
        return DynamicLossScaler(config.initial_loss_scale, config.min_loss_scale,
                                 growth_interval=config.loss_scale_window,
                                 hysteresis=config.hysteresis)
    return ConstantLossScaler()


def build_optimizer(model_chunks: Union[nn.Module, Sequence[nn.Module]],
                    opt_config: OptimizerConfig, groups: ProcessGroups,
                    use_distributed_optimizer: bool = False) -> MixedPrecisionOptimizer:
    """The optimizer for a run: ZeRO-1 or replicated, with the loss scaler the precision needs.

    With ``use_distributed_optimizer`` every chunk must be a :class:`DistributedDataParallel`
    built with ``use_distributed_optimizer=True`` (it owns the sharded buffer layout).
    """
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    ddp_flags = {c.use_distributed_optimizer for c in chunks
                 if isinstance(c, DistributedDataParallel)}
    scaler = build_loss_scaler(opt_config)
    if use_distributed_optimizer:
        return DistributedOptimizer(chunks, opt_config, groups, scaler)
    if True in ddp_flags:
        raise ValueError("the model was wrapped for the distributed optimizer "
                         "(use_distributed_optimizer=True) but build_optimizer was asked for "
                         "the replicated one")
    return MixedPrecisionOptimizer(chunks, opt_config, groups, scaler)
