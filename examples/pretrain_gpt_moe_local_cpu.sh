#!/usr/bin/env bash
# GPT-MoE on one CPU box: N gloo processes, experts split over all of them (EP = N).
#   bash examples/pretrain_gpt_moe_local_cpu.sh DATA_PREFIX VOCAB_JSON MERGES_TXT [extra flags]
# NPROC (4) processes; COMPRESSION (lsh | none), RUN_DIR, DRY_RUN=1: see examples/lib.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/lib.sh
DATA=${1:?data prefix (from tools/preprocess_data.py)}; VOCAB=${2:?vocab.json}; MERGES=${3:?merges.txt}
shift 3
NPROC=${NPROC:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
setup_run gpt_moe_cpu
run_cmd "${PYTHON:-python}" -m megatron_lsh.launch --standalone --nproc-per-node "$NPROC" \
    pretrain_gpt_moe.py --model-recipe tiny-gpt-moe --expert-model-parallel-size "$NPROC" \
    --data-path "$DATA" --split 949,50,1 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --micro-batch-size 4 --global-batch-size $((4 * NPROC)) --train-iters 2000 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 100 --lr-decay-style cosine \
    --eval-interval 200 --eval-iters 10 --log-interval 10 --save-interval 500 \
    --exit-signal-handler --distributed-backend gloo "${RUN_FLAGS[@]}" "$@"
