"""A Megatron-LM launch script's flags drive a real run: the Mixtral example, shrunk.

The flags of Megatron-LM's ``examples/mixtral/train_mixtral_8x7b_distributed.sh`` (sizes
shrunk, its Llama2Tokenizer replaced by the NullTokenizer since no tokenizer model can be
downloaded here) plus EP=4 and LSH compression train a Mixtral-style GPT-MoE (RMSNorm,
RoPE, grouped-query attention, SwiGLU experts, no biases, untied output) for a few
iterations on 4 gloo processes, on Megatron's ``--mock-data``.
"""
from __future__ import annotations

import math

from tests.e2e.util import read_metrics, run_entry

MIXTRAL_FLAGS = (
    "--use-mcore-models --disable-bias-linear --seq-length 32 --max-position-embeddings 64 "
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 112 --num-attention-heads 4 "
    "--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 "
    "--normalization RMSNorm --position-embedding-type rope --swiglu "
    "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
    "--no-masked-softmax-fusion --no-position-embedding --rotary-base 1000000 "
    "--num-experts 4 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss "
    "--moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall "
    "--overlap-param-gather --overlap-grad-reduce --tokenizer-type NullTokenizer "
    "--vocab-size 512 --mock-data --split 99990,8,2 --micro-batch-size 2 "
    "--global-batch-size 8 --lr 1e-3 --train-iters 6 --min-lr 1.0e-5 --weight-decay 0.1 "
    "--clip-grad 1.0 --expert-model-parallel-size 4 --use-distributed-optimizer "
    "--eval-iters 2 --log-interval 2 --no-load-optim --no-load-rng").split()


def test_mixtral_script_flags_train_with_ep_and_lsh(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    args = MIXTRAL_FLAGS + ["--data-cache-path", str(tmp_path / "cache"),
                            "--moe-a2a-compression", "lsh", "--distributed-backend", "gloo",
                            "--metrics-jsonl", str(metrics)]
    proc = run_entry("gpt", args, nproc=4, timeout=300)
    assert "> --moe-grouped-gemm: accepted, nothing to do" in proc.stdout
    assert "--mock-data: random documents over 512 token ids" in proc.stdout
    records = read_metrics(str(metrics))
    assert [r["iteration"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["lm_loss"]) for r in records)
    # Every layer is MoE (Megatron's default --moe-layer-freq 1) and LSH merged rows.
    assert all(len(r["moe"]) == 2 for r in records)
    assert all(0 < layer["compression_rate"] < 1 for r in records for layer in r["moe"])
