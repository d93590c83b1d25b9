#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone:
#   1. set up .venv (torch CPU wheel when no GPU), 2. prepare the Shakespeare corpus,
#   3. train a byte-level BPE tokenizer, 4. preprocess into Megatron .bin/.idx,
#   5. train a tiny GPT-MoE with the LSH-compressed all-to-all on 4 CPU processes (EP=4),
#      with validation, checkpoints, TensorBoard and a metrics JSONL, 6. print a summary.
# Re-running reuses everything prepared and resumes from the last checkpoint.
# Knobs (environment): NPROC (4), TRAIN_ITERS (200), COMPRESSION (lsh), RUN_DIR (runs/quickstart).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/ensure_venv.sh

NPROC=${NPROC:-4}
TRAIN_ITERS=${TRAIN_ITERS:-200}
COMPRESSION=${COMPRESSION:-lsh}
RUN_DIR=${RUN_DIR:-runs/quickstart}
DATA=data/shakespeare
TOK=data/tokenizer
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() { printf '\n== %s\n' "$*"; }

if [[ ! -f $DATA/train.jsonl || ! -f $DATA/valid.jsonl ]]; then
  step "preparing the default corpus (Shakespeare, modern spelling) -> $DATA"
  "$PY" tools/prepare_corpus.py --output-dir "$DATA"
else
  step "corpus ready: $DATA/{train,valid}.jsonl"
fi

if [[ ! -f $TOK/vocab.json || ! -f $TOK/merges.txt ]]; then
  step "training a byte-level BPE tokenizer (8000 tokens) -> $TOK"
  "$PY" tools/train_tokenizer.py --input "$DATA/train.jsonl" --tokenizer-type GPT2BPETokenizer \
      --vocab-size 8000 --output-dir "$TOK"
else
  step "tokenizer ready: $TOK"
fi

TOKENIZER=(--tokenizer-type GPT2BPETokenizer --vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt")
for split in train valid; do
  if [[ ! -f $DATA/${split}_text_document.idx ]]; then
    step "preprocessing $split -> $DATA/${split}_text_document.{bin,idx}"
    "$PY" tools/preprocess_data.py --input "$DATA/$split.jsonl" --output-prefix "$DATA/$split" \
        "${TOKENIZER[@]}" --append-eod --workers 2
  fi
done

mkdir -p "$RUN_DIR"
step "training tiny GPT-MoE, $NPROC processes, EP=$NPROC, all-to-all compression: $COMPRESSION"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt_moe.py \
    --model-recipe tiny-gpt-moe --expert-model-parallel-size "$NPROC" \
    --moe-a2a-compression "$COMPRESSION" \
    --train-data-path "$DATA/train_text_document" --valid-data-path "$DATA/valid_text_document" \
    "${TOKENIZER[@]}" --data-cache-path "$RUN_DIR/index-cache" \
    --micro-batch-size 4 --global-batch-size $((4 * NPROC)) --train-iters "$TRAIN_ITERS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine --clip-grad 1.0 \
    --eval-interval 50 --eval-iters 4 --log-interval 10 \
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 100 \
    --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl" \
    --distributed-backend gloo 2>&1 | tee -a "$RUN_DIR/train.log"

step "summary"
"$PY" - "$RUN_DIR" <<'PY'
import json, sys
run = sys.argv[1]
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
last = rows[-1]
rates = [layer["compression_rate"] for layer in last["moe"]]
print(f"iterations trained : {last['iteration']}")
print(f"first / last loss  : {rows[0]['lm_loss']:.4f} / {last['lm_loss']:.4f}")
print(f"a2a compression    : {sum(rates) / max(len(rates), 1):.3f} (centroids / rows, mean over MoE layers)")
print(f"a2a bytes fwd/bwd  : {sum(l['bytes_fwd'] for l in last['moe']):,} / {sum(l['bytes_bwd'] for l in last['moe']):,} per iteration")
print(f"log                : {run}/train.log")
print(f"checkpoints        : {run}/checkpoints")
print(f"metrics (JSONL)    : {run}/metrics.jsonl")
print(f"TensorBoard events : {run}/tensorboard   (tensorboard --logdir {run}/tensorboard)")
PY
