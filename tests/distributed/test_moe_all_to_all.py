"""The autograd collectives of the dispatch: variable all-to-all, count exchange, TP split."""
import torch
import torch.distributed as dist

from megatron_lsh.moe.compressors.codecs import CODECS, Bf16Codec
from megatron_lsh.parallel.all_to_all import (all_to_all, exchange_counts, gather_from_tp,
                                              split_to_tp)
from megatron_lsh.parallel.spawn import run_distributed

# SEND[src][dst]: rows rank src sends to rank dst (zeros included: nothing to self, nothing back).
SEND = [[0, 3], [0, 2]]


def worker(rank, world):
    group = dist.group.WORLD
    out = {}
    # 1. counts: row r of what I send goes to rank r.
    out["counts"] = exchange_counts(torch.tensor([[SEND[rank][0]], [SEND[rank][1]]]), group)
    # 2. variable all-to-all; rows tagged by (source rank, index); backward swaps the splits.
    input_splits = SEND[rank]
    output_splits = [SEND[src][rank] for src in range(world)]
    x = (100 * rank + torch.arange(sum(input_splits), dtype=torch.float32)).view(-1, 1)
    x = x.repeat(1, 3).requires_grad_()
    y = all_to_all(x, output_splits, input_splits, group)
    out["received"] = y.detach()[:, 0]
    (y * (rank + 1)).sum().backward()
    out["grad"] = x.grad[:, 0]
    # 3. the same through a bf16 wire.
    xb = x.detach().clone().requires_grad_()
    yb = all_to_all(xb, output_splits, input_splits, group, Bf16Codec())
    (yb * 1.5).sum().backward()
    out["bf16"] = (yb.dtype, xb.grad.dtype, float(xb.grad.sum()))
    # 4. a centred fp8 wire, segments per (peer, 2 experts), empty ones included: rows with a
    # large shared component arrive with small errors; constant gradients exactly.
    segments_in = [[0, 0, 2, 1], [0, 0, 1, 1]][rank]
    segments_out = [[0, 0, 0, 0], [2, 1, 1, 1]][rank]
    sent = [50.0 + 0.1 * torch.randn(sum(SEND[src]), 8,
                                     generator=torch.Generator().manual_seed(src))
            for src in range(world)]
    xc = sent[rank].clone().requires_grad_()
    yc = all_to_all(xc, output_splits, input_splits, group, CODECS["fp8-centered"](),
                    segments_out, segments_in)
    expected = torch.cat([sent[src][:SEND[src][0]] if rank == 0 else sent[src][SEND[src][0]:]
                          for src in range(world)])
    out["centered_err"] = float((yc.detach() - expected).abs().max()) if yc.numel() else 0.0
    (yc * 1.5).sum().backward()
    out["centered_grad"] = xc.grad
    # 5. TP split then gather of 5 replicated tokens (shares 3 + 2): identity with TP=1 grads.
    tokens = torch.arange(10, dtype=torch.float32).view(5, 2).requires_grad_()
    share = split_to_tp(tokens, group)
    whole = gather_from_tp(share * 2.0, 5, group)
    (whole * torch.arange(10.0).view(5, 2)).sum().backward()
    out["share_rows"] = share.shape[0]
    out["whole"] = whole.detach()
    out["tokens_grad"] = tokens.grad
    return out


def test_all_to_all_count_exchange_and_tp_split():
    results = run_distributed(worker, 2, timeout=120)
    assert results[0]["counts"].view(-1).tolist() == [0, 0]
    assert results[1]["counts"].view(-1).tolist() == [3, 2]
    assert results[0]["received"].numel() == 0
    assert results[1]["received"].tolist() == [0.0, 1.0, 2.0, 100.0, 101.0]
    # Rank 0 sent 3 rows to rank 1, whose loss scales them by 2; rank 1 kept its 2 rows (x2).
    assert results[0]["grad"].tolist() == [2.0, 2.0, 2.0]
    assert results[1]["grad"].tolist() == [2.0, 2.0]
    for rank in range(2):
        wire_dtype, grad_dtype, grad_sum = results[rank]["bf16"]
        assert wire_dtype == torch.float32 and grad_dtype == torch.float32
        assert grad_sum == 1.5 * 3 * (3 if rank == 0 else 2)
        assert results[rank]["centered_err"] < 0.02       # per-row fp8 would be off by ~2
        assert torch.equal(results[rank]["centered_grad"],
                           torch.full((sum(SEND[rank]), 8), 1.5))
        assert results[rank]["share_rows"] == (3 if rank == 0 else 2)
        assert torch.equal(results[rank]["whole"], 2.0 * torch.arange(10.0).view(5, 2))
        assert torch.equal(results[rank]["tokens_grad"], 2.0 * torch.arange(10.0).view(5, 2))
