"""The hash ablation's plan: runs it shares with the rate-quality sweep are the same runs, and
its two hash families are compared at equal bucket capacity."""
import pytest
import torch

from megatron_lsh.moe.compressors.lsh_ops import codes_from_projections
from tests.unit.test_bench_parsers import _bench

def _pairs(flags):
    """Flags as a set of (flag, value) pairs: the order does not change a run."""
    return set(zip(flags[::2], flags[1::2]))


@pytest.mark.parametrize("compensation", ["none", "residual"])
def test_runs_shared_with_rate_quality_have_the_same_flags(compensation):
    ablation, sweep = _bench("hash_ablation"), _bench("rate_quality")
    shared = [n for n in ablation.runs(compensation) if n in sweep.VARIANTS]
    assert len(shared) >= 4     # none and L = 4, 6, 8 (L = 10 too) are in both
    for name in shared:
        assert _pairs(ablation.runs(compensation)[name]) == _pairs(sweep.VARIANTS[name]), name


def test_family_points_have_the_bucket_capacity_of_the_default():
    ablation = _bench("hash_ablation")
    capacities = {}
    for tag, (family, width, hashes) in ablation.FAMILIES.items():
        projections = torch.randn(4096, hashes * width, generator=torch.Generator().manual_seed(0))
        codes, radices = codes_from_projections(projections, hashes, width, family)
        capacities[tag] = int(torch.tensor(radices).prod())
        keys = {tuple(row) for row in codes.tolist()}
        assert len(keys) == capacities[tag]     # 4096 random rows hit every bucket
    default_codes, default_radices = codes_from_projections(torch.randn(8, 6), 6, 1)
    assert set(capacities.values()) == {int(torch.tensor(default_radices).prod())} == {64}
