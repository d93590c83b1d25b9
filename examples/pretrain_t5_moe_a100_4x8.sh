#!/usr/bin/env bash
# T5-MoE (paper Table 1: 16+16 layers, d 1024, ffn 16384, 16 experts, ~9.3B parameters) on
# 4 nodes x 8 A100 40GB (200 Gb/s). Layout: TP=2 inside a node, DP=16, EP=16, bf16,
# distributed optimizer, full activation recompute. The paper reports 2.2x faster
# time-to-perplexity with LSH here.
#   NODE_RANK=k MASTER_ADDR=node0 bash examples/pretrain_t5_moe_a100_4x8.sh DATA SPM_MODEL
# COMPRESSION (lsh | none), RUN_DIR, DRY_RUN=1: see examples/lib.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/lib.sh
DATA=${1:?data prefix (sentence-level)}; SPM=${2:?SentencePiece model}
shift 2
setup_run t5_moe
run_cmd "${PYTHON:-python}" -m megatron_lsh.launch \
    --nnodes 4 --nproc-per-node 8 --node-rank "${NODE_RANK:?}" \
    --master-addr "${MASTER_ADDR:?}" --master-port "${MASTER_PORT:-29500}" \
    pretrain_t5_moe.py --model-recipe t5-moe \
    --tensor-model-parallel-size 2 --expert-model-parallel-size 16 \
    --data-path "$DATA" --split 949,50,1 --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$SPM" --vocab-extra-ids 100 \
    --micro-batch-size 4 --global-batch-size 1024 --train-iters 100000 \
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-fraction 0.01 --lr-decay-style cosine \
    --bf16 --use-distributed-optimizer --recompute-granularity full \
    --eval-interval 1000 --eval-iters 20 --log-interval 20 --save-interval 2000 \
    --exit-signal-handler --distributed-backend nccl "${RUN_FLAGS[@]}" "$@"
