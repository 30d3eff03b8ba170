"""`python -m nemo_tst.bridge.cli`: a TST run from a Megatron-Bridge recipe, in Bridge's idiom.

Bridge's own `run_recipe.py` looks recipes up in `megatron.bridge.recipes` only and picks the
forward step from a fixed table, so it cannot run TST. This launcher takes the same inputs:

    torchrun --nproc-per-node 8 -m nemo_tst.bridge.cli --recipe llama32_1b_pretrain_config \\
        --tst-bag-size 6 --tst-phase1-fraction 0.3 \\
        train.train_iters=20000 checkpoint.save=/ckpt/run dataset.num_workers=4

1. `--recipe NAME` is a function of `megatron.bridge.recipes` (as run_recipe.py's `--recipe`);
   `--recipe module.path:function` is any importable recipe function. It is called with no
   arguments and returns a pretraining `ConfigContainer`.
2. The `key.path=value` arguments are Hydra-style overrides applied to that container with
   Bridge's `process_config_with_overrides` (as run_recipe.py does), before anything else.
3. `--tst-cpu` (tests, CPU demos): patches Megatron and Bridge for CPU (`nemo_tst.cpu`) and
   sets the container's CPU settings (gloo, local layers).
4. The TST settings (`--tst-*`, one flag per `TSTSettings` field, as `nemo-tst pretrain` takes
   them) then derive the phase containers (`tst_phase_configs`), and
   `tst_pretrain` runs the next unfinished phase: run the same command once per phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Optional, Sequence

from nemo_tst.bridge.checks import BRIDGE_NAMES
from nemo_tst.core.settings import SETTING_FLAG, add_setting_arguments, settings_from_args
from nemo_tst.errors import run_command, user_paths

__all__ = ["LAUNCHER_NAMES", "load_recipe", "main", "parse_args"]

LAUNCHER_NAMES = dataclasses.replace(BRIDGE_NAMES, setting=SETTING_FLAG)
"""What this launcher's user wrote: a `--tst-*` flag for each TST setting, the recipe's
override keys for the rest."""


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """(the launcher's options, the Hydra-style overrides)."""
    p = argparse.ArgumentParser(
        prog="python -m nemo_tst.bridge.cli",
        description="TST pretraining from a Megatron-Bridge recipe (run once per phase).",
    )
    p.add_argument("--recipe", required=True,
                   help="A megatron.bridge.recipes function name, or module.path:function.")
    add_setting_arguments(p.add_argument_group("TST settings (cfg.train.train_iters is N)"), LAUNCHER_NAMES)
    p.add_argument("--tst-phase", default="next", choices=["next", "1", "2"],
                   help="Which phase this launch runs (default: the next unfinished one).")
    p.add_argument("--tst-run-dir", default=None,
                   help="The run directory, which holds both phases' checkpoints (default: checkpoint.save).")
    p.add_argument("--tst-cpu", action="store_true",
                   help="Train on CPU with gloo (needs Megatron-Bridge importable there).")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are key.path=value)")
    return args, rest


def load_recipe(name: str):
    """The recipe function `name` names: `module.path:function`, or a function of
    `megatron.bridge.recipes`."""
    if ":" in name:
        module_name, _, fn_name = name.partition(":")
        module = importlib.import_module(module_name)
    else:
        module, fn_name = importlib.import_module("megatron.bridge.recipes"), name
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        where = module.__name__
        raise ValueError(f"--recipe {name}: {where} has no recipe function {fn_name!r}")
    return fn


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    args, overrides = parse_args(argv)
    tst = settings_from_args(args, LAUNCHER_NAMES)  # settings errors before anything heavy is imported
    if args.tst_cpu:
        from nemo_tst import cpu

        if not cpu.enable_bridge_cpu():
            sys.exit("--tst-cpu runs on CPU, but this rank sees a CUDA GPU: hide it "
                     "(CUDA_VISIBLE_DEVICES=) or drop --tst-cpu")
    from nemo_tst.bridge import require_bridge, tst_pretrain

    require_bridge()
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    cfg = load_recipe(args.recipe)()
    if args.tst_cpu:
        from nemo_tst import cpu

        cpu.bridge_cpu_settings(cfg)
    if overrides:
        cfg = process_config_with_overrides(cfg, cli_overrides=list(overrides))
    phase = args.tst_phase if args.tst_phase == "next" else int(args.tst_phase)
    with user_paths({"--tst-run-dir": args.tst_run_dir, "checkpoint.save": cfg.checkpoint.save}):
        return tst_pretrain(cfg, tst, phase=phase, run_dir=args.tst_run_dir)


if __name__ == "__main__":
    sys.exit(run_command("python -m nemo_tst.bridge.cli", main))
