"""The demo's comparison: a baseline and a TST run of one demo size, side by side, and its summary.

A demo size (conf/demo.yaml) names a recipe; both runs are that recipe's Megatron arguments
with the demo's data, their own s (1 for the baseline) and run directory (`run_argvs`).
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from nemo_tst.conf import CONF_DIR, read_conf
from nemo_tst.core.settings import TSTSettings
from nemo_tst.demo.data import data_overrides, prepare_stdlib_data
from nemo_tst.demo.plot import plot_curves
from nemo_tst.demo.progress import Progress
from nemo_tst.demo.report import print_report, verdict
from nemo_tst.demo.results import read_run, steps_to_reach
from nemo_tst.demo.runs import finished, side_by_side as run_side_by_side, train
from nemo_tst.errors import RunFailed
from nemo_tst.recipes.catalog import load_recipe
from nemo_tst.recipes.config import TSTRecipe

__all__ = ["load_sizes", "run_argvs", "run_demo", "run_overrides", "size_recipe"]

CONF = CONF_DIR / "demo.yaml"


def load_sizes(path: Path = CONF) -> dict:
    """Per demo size its recipe and what only the demo needs, from conf/demo.yaml."""
    return read_conf(path)


def size_recipe(size_name: str) -> TSTRecipe:
    """The recipe of a demo size (demo.yaml `recipe`): model, schedule, the TST run's s and r."""
    return load_recipe(load_sizes()[size_name]["recipe"])


def run_overrides(data: dict, out: Path, name: str, *, bag_size: int, phase1_fraction: float,
                  cpu: bool) -> list[str]:
    """The recipe overrides of one demo run; everything else of its Megatron arguments is the
    recipe's (`run_argvs`)."""
    # Each run its own index cache: side by side, two runs would otherwise build the same
    # validation index files at the same moment.
    return [
        *data_overrides(data, data_dir=out / "data", cpu=cpu, run_dir=out / name,
                        extra_args=["--data-cache-path", str(out / "index_cache" / name)]),
        f"tst.bag_size={bag_size}", f"tst.phase1_fraction={phase1_fraction}",
    ]


def run_argvs(recipe_name: str, data: dict, out: Path, *, bag_size: int, phase1_fraction: float,
              cpu: bool) -> dict[str, list[str]]:
    """{"baseline": argv, "tst": argv}: the `nemo-tst pretrain` arguments of the demo's two runs,
    each the recipe's `megatron_args()` with `run_overrides` (the baseline at s = 1)."""
    runs = {"baseline": 1, "tst": bag_size}
    return {
        name: load_recipe(recipe_name, overrides=run_overrides(
            data, out, name, bag_size=s, phase1_fraction=phase1_fraction, cpu=cpu)).megatron_args()
        for name, s in runs.items()
    }


def run_demo(out: Path, *, size_name: str, bag_size: int, phase1_fraction: float, nproc: int = 1,
             side_by_side: Optional[bool] = None, stream=None) -> dict:
    """Prepare the data, train (or resume) both runs, write summary.json and loss_curves.png to
    `out`, print the report; returns the summary. `side_by_side` None: the size's choice on CPU."""
    import torch

    stream = stream or sys.stdout
    say = lambda text: (stream.write(text + "\n"), stream.flush())  # noqa: E731
    size = load_sizes()[size_name]
    recipe = size_recipe(size_name)  # model and schedule; each run's overrides in run_argvs
    cpu = not torch.cuda.is_available()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_stdlib_data(out / "data", max_bytes=size["corpus_bytes"],
                               vocab_size=recipe.model.vocab_size)
    data_seconds = time.time() - t0
    say(f"[demo] data: {data['train_tokens']:,} train / {data['valid_tokens']:,} held-out tokens "
        f"({data_seconds:.0f}s)")
    argvs = run_argvs(size["recipe"], data, out, bag_size=bag_size, phase1_fraction=phase1_fraction, cpu=cpu)
    N = recipe.training.train_iters
    n1 = TSTSettings(bag_size=bag_size, phase1_fraction=phase1_fraction).phase1_iterations(N)
    if side_by_side is None:
        side_by_side = bool(size.get("side_by_side")) and cpu and nproc == 1
    env = {}
    if side_by_side:  # the cores shared out: one share of torch threads per run
        env["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 2) // 2, 1))

    say(f"[demo] baseline: s=1, {N} iterations of next-token training in one launch; log {out / 'baseline.log'}")
    say(f"[demo] tst: s={bag_size}, phase 1 = iterations 1-{n1} (bags of {bag_size} tokens), phase 2 = "
        f"{n1 + 1}-{N} (next-token); log {out / 'tst.log'}")
    say(f"[demo] {'side by side, ' + env['OMP_NUM_THREADS'] + ' thread(s) each' if side_by_side else 'one after the other'}"
        f"; Megatron's own output goes to the logs")
    train_start = time.time()
    walls = _train_both(out, argvs, N=N, n1=n1, workers=2 if side_by_side else 1, nproc=nproc, env=env,
                        stream=stream)
    train_seconds = time.time() - train_start

    runs = _read_runs(out, argvs, walls)
    base, tst = runs["baseline"], runs["tst"]
    reach = steps_to_reach(tst["valid"], base["final_valid_loss"])
    summary = {
        "size": size_name,
        "device": "cuda" if not cpu else "cpu",
        "iterations": N,
        "recipe": size["recipe"],
        "seq_length": recipe.model.seq_length,
        "global_batch_size": recipe.training.global_batch_size,
        "bag_size": bag_size,
        "phase1_fraction": phase1_fraction,
        "side_by_side": side_by_side,
        "runs": runs,
        "tst_minus_baseline": tst["final_valid_loss"] - base["final_valid_loss"],
        "tst_steps_to_baseline_final_loss": reach,
        "verdict": verdict(base["final_valid_loss"], tst["final_valid_loss"], reach, N),
        "seconds": {"data": round(data_seconds, 1), "training": round(train_seconds, 1),
                    "total": round(time.time() - t0, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plotted = plot_curves(runs, tst["phase1_iters"], out / "loss_curves.png")
    print_report(summary, say, seconds={"data": data_seconds, "training": train_seconds,
                                        "total": summary["seconds"]["total"]},
                 written=[out / "summary.json", *([out / "loss_curves.png"] if plotted else [])])
    return summary


def _train_both(out: Path, argvs: dict, *, N: int, n1: int, workers: int, nproc: int, env: dict,
                stream) -> dict:
    """{name: wall seconds, None for a run already complete}; each run's log is out/<name>.log."""
    progress = Progress({name: {"phase1_iters": 0 if name == "baseline" else n1} for name in argvs}, stream)

    def job(name):
        if finished(out / name, N):
            progress.set_status(name, "complete (reused)")
            return None
        return train(name, argvs[name], log_file=out / f"{name}.log", progress=progress, nproc=nproc,
                     env=env)

    try:
        return run_side_by_side(job, list(argvs), workers=workers)
    finally:
        progress.close()


def _read_runs(out: Path, argvs: dict, walls: dict) -> dict:
    """Each run's results from its log (`read_run`), its final held-out loss and wall time (a
    reused run's from the previous summary.json)."""
    previous = {}
    if (out / "summary.json").is_file():
        previous = json.loads((out / "summary.json").read_text()).get("runs", {})
    runs = {}
    for name, argv in argvs.items():
        log_file = out / f"{name}.log"
        run = read_run(log_file, argv)
        if not run["valid"]:
            raise RunFailed(f"no validation loss found in {log_file}")
        wall = walls[name] if walls.get(name) else previous.get(name, {}).get("wall_seconds", 0.0)
        runs[name] = {
            "bag_size": run["bag_size"], "phase1_iters": run["phase1_iters"], "valid": run["valid"],
            "final_valid_loss": run["valid"][max(run["valid"])], "train_loss": run["train_loss"],
            "text_tokens": run["text_tokens"], "text_tokens_at": run["text_tokens_at"],
            "wall_seconds": round(wall, 1),
        }
    return runs
