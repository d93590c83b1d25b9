#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone:
#   1. set up .venv (torch CPU wheel when no GPU), 2. prepare the Shakespeare corpus,
#   3. train a byte-level BPE tokenizer, 4. preprocess into Megatron .bin/.idx,
#   5. train a tiny GPT-MoE on 4 CPU processes (EP=4) twice, with the dense all-to-all (none)
#      and with the LSH-compressed one, each with validation, checkpoints, TensorBoard and a
#      metrics JSONL, 6. print the comparison.
#   7. draw the loss, compression-rate and bytes curves (tools/plot_run.py) into RUN_DIR.
# Re-running reuses everything prepared and resumes from the last checkpoints (a finished
# run is not trained again).
# Knobs (environment): NPROC (4), TRAIN_ITERS (200), COMPRESSIONS ("none lsh"),
#   RUN_DIR (runs/quickstart; one folder per compressor below it), DRY_RUN=1 (print the
#   commands instead of running them; nothing is installed or written).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ${DRY_RUN:-0} == 1 ]]; then
  PY=${PY:-python}
  run() { printf '%q ' "$@"; printf '\n'; }
else
  source tools/ensure_venv.sh
  run() { "$@"; }
fi

NPROC=${NPROC:-4}
TRAIN_ITERS=${TRAIN_ITERS:-200}
COMPRESSIONS=${COMPRESSIONS:-none lsh}
RUN_DIR=${RUN_DIR:-runs/quickstart}
DATA=data/shakespeare
TOK=data/tokenizer
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() { printf '\n== %s\n' "$*"; }

if [[ ! -f $DATA/train.jsonl || ! -f $DATA/valid.jsonl ]]; then
  step "preparing the default corpus (Shakespeare, modern spelling) -> $DATA"
  run "$PY" tools/prepare_corpus.py --output-dir "$DATA"
else
  step "corpus ready: $DATA/{train,valid}.jsonl"
fi

if [[ ! -f $TOK/vocab.json || ! -f $TOK/merges.txt ]]; then
  step "training a byte-level BPE tokenizer (8000 tokens) -> $TOK"
  run "$PY" tools/train_tokenizer.py --input "$DATA/train.jsonl" --tokenizer-type GPT2BPETokenizer \
      --vocab-size 8000 --output-dir "$TOK"
else
  step "tokenizer ready: $TOK"
fi

TOKENIZER=(--tokenizer-type GPT2BPETokenizer --vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt")
for split in train valid; do
  if [[ ! -f $DATA/${split}_text_document.idx ]]; then
    step "preprocessing $split -> $DATA/${split}_text_document.{bin,idx}"
    run "$PY" tools/preprocess_data.py --input "$DATA/$split.jsonl" --output-prefix "$DATA/$split" \
        "${TOKENIZER[@]}" --append-eod --workers 2
  fi
done

for COMPRESSION in $COMPRESSIONS; do
RUN="$RUN_DIR/$COMPRESSION"
step "training tiny GPT-MoE, $NPROC processes, EP=$NPROC, all-to-all compression: $COMPRESSION"
[[ ${DRY_RUN:-0} == 1 ]] || mkdir -p "$RUN"
run "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt_moe.py \
    --model-recipe tiny-gpt-moe --expert-model-parallel-size "$NPROC" \
    --moe-a2a-compression "$COMPRESSION" \
    --train-data-path "$DATA/train_text_document" --valid-data-path "$DATA/valid_text_document" \
    "${TOKENIZER[@]}" --data-cache-path "$RUN_DIR/index-cache" \
    --micro-batch-size 4 --global-batch-size $((4 * NPROC)) --train-iters "$TRAIN_ITERS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine --clip-grad 1.0 \
    --eval-interval 50 --eval-iters 4 --log-interval 10 \
    --save "$RUN/checkpoints" --load "$RUN/checkpoints" --save-interval 100 \
    --tensorboard-dir "$RUN/tensorboard" --metrics-jsonl "$RUN/metrics.jsonl" \
    --distributed-backend gloo 2>&1 | if [[ ${DRY_RUN:-0} == 1 ]]; then cat; else tee -a "$RUN/train.log"; fi
done
[[ ${DRY_RUN:-0} == 1 ]] && exit 0

step "comparison"
"$PY" - "$RUN_DIR" $COMPRESSIONS <<'PY'
import re, sys
from megatron_lsh.training.logger import read_metrics
run_dir, names = sys.argv[1], sys.argv[2:]
VALID = re.compile(r"validation loss at iteration \d+ \| lm loss value: ([0-9.Ee+-]+)")
stats = {}
for name in names:
    run = f"{run_dir}/{name}"
    rows = read_metrics(f"{run}/metrics.jsonl")
    tail = rows[-20:]
    layers = [layer for r in tail for layer in r["moe"]]
    valid = [r["validation"]["lm_loss"] for r in read_metrics(f"{run}/metrics.jsonl", "validation")]
    # Runs logged before validation reached the metrics file: read the log's boxes instead.
    valid = valid or VALID.findall(open(f"{run}/train.log").read())
    stats[name] = dict(
        iters=rows[-1]["iteration"], valid=float(valid[-1]) if valid else float("nan"),
        rate=sum(layer["compression_rate"] for layer in layers) / max(len(layers), 1),
        bytes=sum(l["bytes_fwd"] + l["bytes_bwd"] for r in tail for l in r["moe"]) / len(tail),
        ms=sorted(r["ms_per_iter"] for r in tail)[len(tail) // 2])
dense = stats.get("none", {}).get("bytes")
print(f"{'compressor':10s} {'iters':>5s} {'valid loss':>10s} {'rate':>6s} "
      f"{'a2a bytes/iter':>14s} {'/ none':>7s} {'ms/iter':>8s}")
for name, s in stats.items():
    ratio = f"{s['bytes'] / dense:7.3f}" if dense else f"{'-':>7s}"
    print(f"{name:10s} {s['iters']:5d} {s['valid']:10.4f} {s['rate']:6.3f} {s['bytes']:14,.0f} "
          f"{ratio} {s['ms']:8.1f}")
print(f"logs, checkpoints, TensorBoard and metrics: {run_dir}/<compressor>/ "
      f"(tensorboard --logdir {run_dir})")
PY
step "curves"
RUNS=()
for COMPRESSION in $COMPRESSIONS; do RUNS+=("$RUN_DIR/$COMPRESSION"); done
"$PY" tools/plot_run.py "${RUNS[@]}" --out "$RUN_DIR"
