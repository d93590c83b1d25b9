#!/usr/bin/env bash
# RoBERTa-MoE (paper Table 1: 12 layers, d 768, 16 experts) on 2 nodes x 8 V100 (100 Gb/s).
# Run on every node with NODE_RANK=0/1 and MASTER_ADDR set to node 0:
#   NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_roberta_moe_v100_2x8.sh DATA SPM_MODEL
# Layout: DP=16 over 16 GPUs, EP=16 (one expert per GPU), fp16 with dynamic loss scaling
# (V100 has no bf16). The paper reports 1.6x faster time-to-perplexity with LSH here.
# COMPRESSION (lsh | none), RUN_DIR, DRY_RUN=1: see examples/lib.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/lib.sh
DATA=${1:?data prefix (sentence-level, --split-sentences)}; SPM=${2:?SentencePiece model}
shift 2
setup_run roberta_moe
run_cmd "${PYTHON:-python}" -m megatron_lsh.launch \
    --nnodes 2 --nproc-per-node 8 --node-rank "${NODE_RANK:?}" \
    --master-addr "${MASTER_ADDR:?}" --master-port "${MASTER_PORT:-29500}" \
    pretrain_roberta_moe.py --model-recipe roberta-moe --expert-model-parallel-size 16 \
    --data-path "$DATA" --split 949,50,1 --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$SPM" --micro-batch-size 16 --global-batch-size 2048 \
    --train-iters 125000 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 10000 \
    --lr-decay-style linear --weight-decay 0.01 --clip-grad 1.0 --fp16 \
    --eval-interval 1000 --eval-iters 50 --log-interval 50 --save-interval 5000 \
    --exit-signal-handler --distributed-backend nccl "${RUN_FLAGS[@]}" "$@"
