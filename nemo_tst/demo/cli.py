"""`nemo-tst demo`'s command line: its options, their checks, and the optional export."""

import argparse
import sys
from pathlib import Path

from nemo_tst.core.settings import SettingError, TSTSettings
from nemo_tst.demo.compare import load_sizes, run_demo, size_recipe

__all__ = ["check_demo_settings", "demo_main"]


def check_demo_settings(bag_size, phase1_fraction, train_iters: int, size: str, out: Path) -> None:
    """The demo's own arguments, before any data is built or run trained."""

    try:
        settings = TSTSettings(bag_size=bag_size, phase1_fraction=phase1_fraction)
    except SettingError as err:
        raise ValueError(err.named({"bag_size": "--bag-size", "phase1_fraction": "--phase1-fraction"})) from None
    if bag_size < 2:
        raise ValueError(f"--bag-size {bag_size}: the demo compares TST (s >= 2) with the s = 1 "
                         "baseline it trains itself; give --bag-size 2 or more")
    n1 = settings.phase1_iterations(train_iters)
    if not 1 <= n1 <= train_iters - 1:
        raise ValueError(f"--phase1-fraction {phase1_fraction} of the {size} size's {train_iters} steps "
                         f"gives {n1} phase-1 steps; it must give between 1 and {train_iters - 1}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")


def demo_main(argv: list[str]) -> None:
    from nemo_tst import demo
    from nemo_tst.errors import ArgumentParser, positive_int, user_paths

    parser = ArgumentParser(prog="nemo-tst demo", description=demo.__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--size", choices=["auto", *load_sizes()], default="auto",
                        help="auto: gpu when CUDA is available, else cpu")
    parser.add_argument("--bag-size", type=int, default=None,
                        help="s of the TST run (default: tst.bag_size of the size's recipe, "
                             "conf/demo.yaml)")
    parser.add_argument("--phase1-fraction", type=float, default=None,
                        help="r of the TST run (default: the recipe's tst.phase1_fraction)")
    parser.add_argument("--nproc-per-node", type=positive_int, default=1)
    parser.add_argument("--one-after-the-other", action="store_true",
                        help="train the two runs one after the other, not side by side")
    parser.add_argument("--export-hf", action="store_true",
                        help="then export both final models as Hugging Face checkpoints to "
                             "OUT/hf/baseline and OUT/hf/tst (nemo-tst export-hf; replaces an "
                             "earlier export there)")
    opts = parser.parse_args(argv)
    with user_paths({"--out": opts.out}):
        _demo_command(opts)


def _demo_command(opts: argparse.Namespace) -> None:
    import torch

    size = opts.size if opts.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if opts.export_hf:
        import importlib.util

        if importlib.util.find_spec("safetensors") is None:  # checked before any training
            raise ValueError("--export-hf needs safetensors: pip install 'nemo-tst[hf]'")
    recipe = size_recipe(size)
    bag_size = opts.bag_size if opts.bag_size is not None else recipe.tst.bag_size
    phase1_fraction = opts.phase1_fraction if opts.phase1_fraction is not None else recipe.tst.phase1_fraction
    check_demo_settings(bag_size, phase1_fraction, recipe.training.train_iters, size, opts.out)
    try:
        run_demo(opts.out, size_name=size, bag_size=bag_size, phase1_fraction=phase1_fraction,
                 nproc=opts.nproc_per_node, side_by_side=False if opts.one_after_the_other else None)
    except KeyboardInterrupt:  # Ctrl-C reached the trainers too (same process group)
        print("\n[demo] interrupted: rerun the same command to resume (checkpoints and finished runs "
              "are kept)", file=sys.stderr)
        raise SystemExit(130) from None
    if opts.export_hf:
        from nemo_tst.export import export_hf

        for name in ("baseline", "tst"):
            written = export_hf(opts.out / name, opts.out / "hf" / name, overwrite=True)
            print(f"[demo] {name}: exported to {written} (AutoModelForCausalLM.from_pretrained)", flush=True)
