#!/usr/bin/env bash
# The main job: a small GPT-2 trained from scratch on the bundled WikiText-2 (word-level v1 files),
# on the CPU, in a few minutes. Prints perplexity, accuracy and FPS at the end, and draws the loss,
# perplexity and accuracy curves into OUTPUT_DIR/curves.png (evaluating every 50 steps for them).
#
#   bash scripts/quickstart.sh [extra run_clm.py flags, which win over the ones below]
#
# Everything is local: the GPT-2 tokenizer and the text ship in data/, and the hub is not used.
# Stopped (Ctrl+C), it resumes from its last checkpoint when run again; finished, running it
# again changes nothing (--overwrite_output_dir starts over only for other flags or MAX_STEPS).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
OUT="${OUTPUT_DIR:-outputs/quickstart}"
export HF_HUB_OFFLINE=1

"$PYTHON" run_clm.py \
    --model_type gpt2 \
    --config_overrides "n_layer=4,n_embd=128,n_head=4,n_positions=128" \
    --tokenizer_name data/tokenizers/gpt2 \
    --train_file data/wikitext-2-v1/wiki.train.tokens \
    --validation_file data/wikitext-2-v1/wiki.valid.tokens \
    --block_size 128 \
    --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
    --learning_rate 1e-3 --warmup_steps 30 --weight_decay 0.01 \
    --max_steps "${MAX_STEPS:-200}" --max_eval_samples 256 \
    --logging_steps 20 --save_steps 100 --save_total_limit 1 --eval_strategy steps --eval_steps 50 \
    --do_train --do_eval --use_cpu --report_to none \
    --output_dir "$OUT" --overwrite_output_dir "$@"

"$PYTHON" - "$OUT/all_results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"perplexity {r['perplexity']:.1f} | accuracy {r['eval_accuracy']:.4f} | "
      f"FPS {r['fps']:.1f} samples/s ({r['fps_tokens_per_second']:.0f} tokens/s) after {r['fps_warmup_steps']} warm-up steps")
PY

# The curves: training loss every 20 steps, evaluation every 50 (scripts/plot_curves.py).
"$PYTHON" scripts/plot_curves.py "$OUT" --out "$OUT/curves.png"
