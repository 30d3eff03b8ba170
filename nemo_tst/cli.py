"""The `nemo-tst` command.

    nemo-tst pretrain [--nproc-per-node N] <Megatron-LM GPT arguments> --tst-bag-size S ...
    nemo-tst preprocess --input PATH [PATH ...] --output-prefix PREFIX (--tokenizer tokenizer.json
                        | --train-tokenizer --vocab-size V) [--workers W] [--held-out-fraction F]
    nemo-tst demo [--out DIR] [--bag-size 4] [--phase1-fraction 0.3] [--size ci|cpu|gpu]

Every command validates its input before doing expensive work and exits non-zero with a
message naming the setting to fix.
"""

import argparse
import sys
import warnings
from pathlib import Path

# megatron-core warns at import about optional CUDA extensions (Apex, Transformer Engine) and
# experimental modules; none of it is actionable for a nemo-tst user.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|transformer-engine|absl|experimental).*")

__all__ = ["main"]


def _pretrain(rest: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="nemo-tst pretrain",
        description="Two-phase TST pretraining with Megatron-LM's trainer. All arguments other "
        "than these are Megatron-LM GPT arguments (--num-layers, --seq-length, --save, ...) and "
        "--tst-* arguments (see `python -m nemo_tst.training.pretrain --help`).",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="Processes (GPUs, or CPU ranks with --tst-cpu) on this machine.")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="Append the trainer's output here instead of the terminal.")
    opts, megatron_argv = parser.parse_known_args(rest)
    from nemo_tst.training.driver import run

    plan = run(megatron_argv, nproc=opts.nproc_per_node, log_file=opts.log_file)
    print(
        f"[nemo-tst] done: {plan.phase1_iters} phase-1 iterations (s={plan.superposition.bag_size})"
        f" + {plan.phase2_iters} phase-2 iterations; "
        f"{plan.text_tokens_after(plan.train_iters):,} text tokens"
    )


def _preprocess(rest: list[str]) -> None:
    from nemo_tst.data.cli import preprocess_main

    preprocess_main(rest)


def _demo(rest: list[str]) -> None:
    from nemo_tst.demo import demo_main

    demo_main(rest)


COMMANDS = {"pretrain": _pretrain, "preprocess": _preprocess, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnemo-tst: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"nemo-tst {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
