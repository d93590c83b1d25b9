"""Splitting rows among TP ranks: token shares and the per-expert payload shares of LSH."""
import pytest
import torch

from megatron_lsh.parallel.all_to_all import tp_row_shares, tp_share_sizes


@pytest.mark.parametrize("counts, tp", [([5, 0, 3, 8], 2), ([1, 1, 1], 4), ([0, 0], 2),
                                        ([7, 2, 9, 4, 1], 3)])
def test_payload_shares_cover_every_row_once_in_block_order(counts, tp):
    shares, share_counts = tp_row_shares(counts, tp)
    assert len(shares) == len(share_counts) == tp
    everything = torch.cat(shares)
    assert sorted(everything.tolist()) == list(range(sum(counts)))
    offsets = [sum(counts[:e]) for e in range(len(counts))]
    for rank, (idx, per_block) in enumerate(zip(shares, share_counts)):
        assert int(per_block.sum()) == idx.numel()
        assert torch.equal(idx, torch.sort(idx).values)          # block order kept
        start = 0
        for e, (c, n) in enumerate(zip(counts, per_block.tolist())):
            block = idx[start:start + n]
            start += n
            assert all(offsets[e] <= i < offsets[e] + c for i in block.tolist())
            assert n in (c // tp, -(-c // tp))                    # as even as possible


def test_token_shares_are_balanced():
    assert tp_share_sizes(10, 4) == [3, 3, 2, 2] and sum(tp_share_sizes(7, 3)) == 7
