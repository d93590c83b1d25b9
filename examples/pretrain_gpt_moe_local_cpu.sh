#!/usr/bin/env bash
# GPT-MoE on one CPU box: N gloo processes, experts split over all of them (EP = N).
# Usage: bash examples/pretrain_gpt_moe_local_cpu.sh DATA_PREFIX VOCAB_JSON MERGES_TXT [extra flags]
set -euo pipefail
DATA=${1:?data prefix (from tools/preprocess_data.py)}; VOCAB=${2:?vocab.json}; MERGES=${3:?merges.txt}
shift 3
NPROC=${NPROC:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt_moe.py \
    --model-recipe tiny-gpt-moe --expert-model-parallel-size "$NPROC" \
    --moe-a2a-compression lsh --moe-lsh-num-hashes 6 \
    --data-path "$DATA" --split 949,50,1 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --micro-batch-size 4 --global-batch-size $((4 * NPROC)) --train-iters 2000 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 100 --lr-decay-style cosine \
    --eval-interval 200 --eval-iters 10 --log-interval 10 \
    --save runs/gpt_moe_cpu/ckpt --load runs/gpt_moe_cpu/ckpt --save-interval 500 \
    --tensorboard-dir runs/gpt_moe_cpu/tb --metrics-jsonl runs/gpt_moe_cpu/metrics.jsonl \
    --distributed-backend gloo "$@"
