#!/usr/bin/env bash
# Submit a two-phase TST run of a paper-scale recipe to Slurm (pyxis/enroot containers) with
# NeMo-Run: phase 1, then phase 2 with `afterok` on it. Resubmitting the same command resumes.
# Usage: RECIPE=tst_qwen3_10b_a1b GPUS=64 ACCOUNT=acct PARTITION=batch \
#        IMAGE=registry/nemo-tst:0.1 MOUNTS=/lustre:/lustre \
#        DATA=/lustre/data/mix RUN_DIR=/lustre/ckpt/moe bash recipes/slurm_tst.sh [--dryrun] \
#        [recipe.section.field=value ...]
# Recipes: `nemo-tst recipes`; what a run costs: `nemo-tst plan $RECIPE --gpus $GPUS`.
set -euo pipefail
: "${RECIPE:?set RECIPE to a recipe name (nemo-tst recipes lists them)}"
: "${ACCOUNT:?set ACCOUNT to your Slurm account}"
: "${IMAGE:?set IMAGE to the container image built from docker/Dockerfile}"
: "${DATA:?set DATA to the prefix written by nemo-tst preprocess (as seen inside the container)}"
: "${RUN_DIR:?set RUN_DIR to the checkpoint directory (as seen inside the container)}"
GPUS="${GPUS:-8}"
PRECISION="${PRECISION:-bf16}"

exec nemo-tst run --factory "${RECIPE}(gpus=${GPUS}, precision=${PRECISION})" \
  recipe.data.prefix="$DATA" recipe.run_dir="$RUN_DIR" \
  run.executor=slurm run.executor.account="$ACCOUNT" \
  ${PARTITION:+run.executor.partition="$PARTITION"} \
  run.executor.container_image="$IMAGE" \
  run.executor.container_mounts="[${MOUNTS:+\"$MOUNTS\"}]" \
  run.executor.time="${TIME:-04:00:00}" \
  "$@"
