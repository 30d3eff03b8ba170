#!/usr/bin/env bash
# TST pretraining of a Llama-style GPT on one node with Megatron-LM's trainer.
# Usage: DATA=/data/corpus TOKENIZER=/data/corpus_tokenizer.json SAVE=/ckpt/run1 \
#        GPUS=8 bash recipes/pretrain_gpt_tst.sh [extra Megatron or --tst-* arguments]
# Defaults: the paper's 270M dense shape (SmolLM2-135M layout), s=6, r=0.3, WSD over 20k steps.
set -euo pipefail
: "${DATA:?set DATA to the prefix written by nemo-tst preprocess (without _train/_valid)}"
: "${TOKENIZER:?set TOKENIZER to its tokenizer.json}"
: "${SAVE:?set SAVE to the run directory}"
GPUS="${GPUS:-8}"
ITERS="${ITERS:-20000}"

exec nemo-tst pretrain --nproc-per-node "$GPUS" \
  --num-layers 30 --hidden-size 576 --ffn-hidden-size 1536 \
  --num-attention-heads 9 --group-query-attention --num-query-groups 3 \
  --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights \
  --position-embedding-type rope --rotary-base 100000 \
  --seq-length 2048 --max-position-embeddings 2048 \
  --micro-batch-size 8 --global-batch-size 1024 \
  --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-decay-style WSD \
  --lr-wsd-decay-style linear --lr-wsd-decay-iters $((ITERS / 10)) --lr-warmup-iters 2000 \
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16 \
  --use-distributed-optimizer --train-data-path "${DATA}_train" --valid-data-path "${DATA}_valid" \
  --eval-interval 500 --eval-iters 20 --log-interval 10 --save-interval 1000 \
  --ckpt-format torch_dist --save "$SAVE" --tst-tokenizer "$TOKENIZER" \
  --tst-bag-size 6 --tst-phase1-fraction 0.3 \
  "$@"
