"""Mixture-of-Experts: router, grouped experts, the all-to-all dispatcher and its compressors.

``MoELayer`` is what the model code uses; the other names are exported for tests and
benchmarks. Compressors live one per file in :mod:`megatron_lsh.moe.compressors`.
"""
from megatron_lsh.moe.compressors import Compressor, build_compressor, compressor_names
from megatron_lsh.moe.dispatcher import AllToAllDispatcher
from megatron_lsh.moe.experts import GroupedExperts
from megatron_lsh.moe.layer import MoELayer
from megatron_lsh.moe.router import Routing, TopKRouter
from megatron_lsh.moe.stats import MoEStats

__all__ = ["MoELayer", "MoEStats", "TopKRouter", "Routing", "GroupedExperts",
           "AllToAllDispatcher", "Compressor", "build_compressor", "compressor_names"]
