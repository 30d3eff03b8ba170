#!/usr/bin/env bash
# TST pretraining on one node with Megatron-LM's trainer, without NeMo-Run: `nemo-tst pretrain`
# with a recipe's arguments. The arguments are not written here: `nemo-tst plan RECIPE --args`
# prints them from the recipe (conf/recipes/RECIPE.yaml), after validating it, so this
# script launches exactly what `nemo-tst plan` and `nemo-tst run` describe.
# Usage: DATA=/data/corpus SAVE=/ckpt/run1 [GPUS=8] [RECIPE=tst_llama3_270m] [PRECISION=bf16] \
#        [TOKENIZER=/data/corpus_tokenizer.json] [ITERS=20000] \
#        bash recipes/pretrain_gpt_tst.sh [section.field=value ...] [extra Megatron or --tst-* arguments]
# Default: the paper's 270M dense model (SmolLM2-135M shape), s=6, r=0.3, WSD over 20k steps.
# GPUS picks the recipe's parallel preset (`nemo-tst recipes`); TOKENIZER defaults to
# DATA_tokenizer.json (what `nemo-tst preprocess` writes); ITERS overrides training.train_iters.
# Leading section.field=value arguments are recipe overrides; the rest go to `nemo-tst pretrain`
# after the recipe's arguments (later occurrences win in Megatron's parser).
set -euo pipefail
: "${DATA:?set DATA to the prefix written by nemo-tst preprocess (without _train/_valid)}"
: "${SAVE:?set SAVE to the run directory}"
RECIPE="${RECIPE:-tst_llama3_270m}"
GPUS="${GPUS:-8}"
PRECISION="${PRECISION:-bf16}"

OVERRIDES=(data.prefix="$DATA" run_dir="$SAVE")
[[ -n "${TOKENIZER:-}" ]] && OVERRIDES+=(data.tokenizer="$TOKENIZER")
[[ -n "${ITERS:-}" ]] && OVERRIDES+=(training.train_iters="$ITERS")
while [[ $# -gt 0 && "$1" != -* && "$1" == *=* ]]; do
  OVERRIDES+=("$1")
  shift
done

if ! TEXT="$(nemo-tst plan "$RECIPE" "${OVERRIDES[@]}" --gpus "$GPUS" --precision "$PRECISION" --args)" \
    || [[ -z "$TEXT" ]]; then
  echo "pretrain_gpt_tst.sh: \`nemo-tst plan $RECIPE --gpus $GPUS\` refused the recipe (above); nothing launched" >&2
  exit 1
fi
mapfile -t ARGS <<< "$TEXT"

exec nemo-tst pretrain --nproc-per-node "$GPUS" "${ARGS[@]}" "$@"
