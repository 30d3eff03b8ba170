#!/usr/bin/env bash
# The image's entrypoint: `docker run IMAGE pretrain ...` runs `nemo-tst pretrain ...`; any
# other command (torchrun, python, bash: what NeMo-Run's Docker and Slurm executors send) runs
# as given.
set -e
case "${1:-}" in
  ""|-h|--help|pretrain|preprocess|demo|plan|recipes|run) exec nemo-tst "$@" ;;
  *) exec "$@" ;;
esac
