"""`nemo-tst demo`: a baseline and a two-phase TST run at equal FLOPs per step, end to end.

1. Corpus: the Python standard library's sources installed with this interpreter, split by
   file into train / validation (present on every machine, no download).
2. A byte-level BPE trained on the training files; Megatron indexed datasets written with it.
3. Two runs of the real Megatron model, trainer, datasets and checkpoints, same model, L,
   global batch, iterations and WSD schedule:
     baseline   ordinary next-token training (`--tst-bag-size 1`: every TST code path reduces
                to standard training at s=1), one launch
     tst        phase 1 with bags of s tokens for the first r of the steps, then recovery
   On CPU the two run side by side, one thread each (conf/demo.yaml `side_by_side`): on two
   cores that trains more steps a minute than one run after the other on two threads, and the
   comparison stays fair (same model, data, steps and schedule; only the wall clock is shared).
4. A table with the verdict, `summary.json` and `loss_curves.png` in --out.

The terminal shows the demo's own lines and one live progress line per run (step, training
loss, held-out loss, ETA); everything the trainer prints (Megatron's argument dump, warnings,
every rank) goes to the run's log file, --out/<run>.log.

Sizes (conf/demo.yaml, each a recipe): "ci" (recipe tst_tiny) is a smoke test (about a minute),
"cpu" (tst_demo_cpu) fits in ten minutes on two cores, "gpu" (tst_demo_gpu) is a larger model and
many more steps. Both runs get the recipe's Megatron arguments (`run_argvs`). Rerunning the
same command resumes: data already prepared is reused, finished runs are skipped, unfinished
ones continue.
"""

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from nemo_tst.conf import CONF_DIR, read_conf
from nemo_tst.core.settings import SettingError, TSTSettings
from nemo_tst.errors import RunFailed, is_user_error, user_paths
from nemo_tst.recipes.catalog import load_recipe
from nemo_tst.recipes.config import TSTRecipe

__all__ = [
    "SCALE_VERDICT", "Progress", "demo_main", "load_sizes", "prepare_stdlib_data", "run_argvs",
    "run_demo", "run_overrides", "size_recipe", "verdict",
]

CONF = CONF_DIR / "demo.yaml"

# -- for the lead to fill from the benchmark (docs/benchmarks.md) ---------------------------------
SCALE_VERDICT = (
    "on this 0.8M-parameter model TST s=2 ended 0.04-0.05 nats below its baseline only from "
    "3,000 steps on (docs/benchmarks.md), and the paper's clear gains start at 270M parameters "
    "and 20k steps"
)
"""The one sentence the demo prints after a TST loss: which scale the measurements point to for
a gain. Keep it one sentence, without a final full stop."""
# ---------------------------------------------------------------------------------------------------


def load_sizes(path: Path = CONF) -> dict:
    """Per demo size its recipe and what only the demo needs, from conf/demo.yaml."""
    return read_conf(path)


def prepare_stdlib_data(out: Path, *, max_bytes, vocab_size: int, workers: int = 1) -> dict:
    """Corpus -> tokenizer.json -> <out>/stdlib_train, <out>/stdlib_valid. Reused if present."""
    from nemo_tst.data import HFTokenizer, build_stdlib_corpus, iter_texts, preprocess, train_bpe

    out.mkdir(parents=True, exist_ok=True)
    done = out / "data.json"
    if done.is_file():
        return json.loads(done.read_text())
    corpus = build_stdlib_corpus(out, max_bytes=max_bytes)
    tokenizer_path = out / "tokenizer.json"
    train_bpe(iter_texts(corpus.train), vocab_size=vocab_size, save_path=tokenizer_path)
    tokenizer = HFTokenizer.from_file(tokenizer_path)
    result = preprocess(
        list(corpus.train), str(out / "stdlib"), tokenizer, held_out_inputs=list(corpus.valid),
        workers=workers, overwrite=True,
    )
    info = {
        "tokenizer": str(tokenizer_path),
        "train_prefix": result.train.prefix,
        "valid_prefix": result.valid.prefix,
        "train_tokens": result.train.tokens,
        "valid_tokens": result.valid.tokens,
        "vocab_size": tokenizer.vocab_size,
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def size_recipe(size_name: str) -> TSTRecipe:
    """The recipe of a demo size (demo.yaml `recipe`): model, schedule, the TST run's s and r."""
    return load_recipe(load_sizes()[size_name]["recipe"])


def _quoted(value) -> str:
    """An override value read back as this exact string (a path may hold YAML syntax)."""
    return json.dumps(str(value))


def run_overrides(data: dict, out: Path, name: str, *, bag_size: int, phase1_fraction: float,
                  cpu: bool) -> list[str]:
    """The recipe overrides of one demo run; everything else of its Megatron arguments is the
    recipe's (`run_argvs`)."""
    prefix = data["train_prefix"].removesuffix("_train")
    if data["valid_prefix"] != f"{prefix}_valid":
        raise ValueError(f"{out / 'data' / 'data.json'}: held-out data {data['valid_prefix']} is not "
                         f"{prefix}_valid; delete {out / 'data'} to prepare the data again")
    return [
        f"data.prefix={_quoted(prefix)}", f"data.tokenizer={_quoted(data['tokenizer'])}",
        f"model.vocab_size={data['vocab_size']}",  # the BPE trained may hold fewer tokens than asked
        "data.num_workers=0",  # small data: no loader worker processes to start
        f"cpu={'true' if cpu else 'false'}",
        "transformer_impl=local",  # the demo runs in a pip install, without Transformer Engine
        f"tst.bag_size={bag_size}", f"tst.phase1_fraction={phase1_fraction}",
        f"run_dir={_quoted(out / name)}",
        # Each run its own index cache: side by side, two runs would otherwise build the same
        # validation index files at the same moment.
        f"extra_args={json.dumps(['--data-cache-path', str(out / 'index_cache' / name)])}",
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


def steps_to_reach(valid: dict[int, float], target: float):
    """First evaluated iteration whose held-out loss is at or below `target` (None if never)."""
    return next((it for it in sorted(valid) if valid[it] <= target), None)


def verdict(base_final: float, tst_final: float, reach: Optional[int], iterations: int) -> str:
    """What the two final held-out losses say, in one sentence."""
    delta = tst_final - base_final
    if delta > 0:
        return f"TST ends ABOVE the baseline, i.e. worse after {iterations} steps; {SCALE_VERDICT}."
    if delta == 0:
        return "TST ends level with the baseline."
    where = (f"it reached the baseline's final loss ({base_final:.4f}) at step {reach} of "
             f"{iterations}" + (f", {iterations / reach:.2f}x fewer steps" if reach and reach < iterations else ""))
    return f"TST ends {-delta:.4f} nats BELOW the baseline, i.e. better; {where}."


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One live line per run: step, latest training loss, latest held-out loss, ETA.

    On a terminal the lines are redrawn in place; otherwise (CI logs, a pipe) each run prints a
    plain line at most every `every` seconds and when it finishes. `feed` takes the trainer's
    output lines (from any thread), `note` prints one of the demo's own lines."""

    def __init__(self, runs: dict[str, dict], stream=None, *, tty: Optional[bool] = None, every: float = 30.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self.lock = threading.Lock()
        self.state = {name: dict(info, step=None, loss=None, held_out=None, rate_from=None,
                                 status="waiting", printed=0.0) for name, info in runs.items()}
        self.drawn = 0  # live lines currently on the terminal

    # -- input ----------------------------------------------------------------------------------
    def feed(self, name: str, line: str) -> None:
        from nemo_tst.training.logs import is_training_start, iteration_line, training_loss, validation_line

        st = self.state[name]
        now = time.time()
        if is_training_start(line):  # a trainer process starts its loop: restart the rate
            st["rate_from"] = None
            return
        held_out = validation_line(line)
        if held_out is not None:
            st["held_out"] = held_out[1]
            return
        parsed = iteration_line(line)
        if parsed is None:
            return
        it, total, values = parsed
        if "tst loss" not in values and "lm loss" not in values:
            return
        st.update(step=it, total=total, status="training", loss=training_loss(values))
        if st["rate_from"] is None:
            st["rate_from"] = (it, now)
        self._update(name, now)

    def set_status(self, name: str, status: str) -> None:
        with self.lock:
            self.state[name]["status"] = status
            self._show(name, final=status not in ("waiting", "starting", "training"))

    def note(self, text: str) -> None:
        with self.lock:
            self._clear()
            self.stream.write(text + "\n")
            self._redraw()

    def close(self) -> None:
        with self.lock:
            self.drawn = 0
            self.stream.flush()

    # -- output ---------------------------------------------------------------------------------
    def line(self, name: str) -> str:
        st = self.state[name]
        head = f"{name:<9}"
        if st["step"] is None:
            return f"{head}{st['status']}"
        phase = ""
        if st.get("phase1_iters"):
            phase = f" phase {1 if st['step'] <= st['phase1_iters'] else 2}"
        text = f"{head}step {st['step']:>5}/{st['total']}{phase} | loss {st['loss']:.3f}"
        if st["held_out"] is not None:
            text += f" | held-out {st['held_out']:.3f}"
        if st["status"] == "training":
            text += f" | ETA {self._eta(st)}"
        else:
            text += f" | {st['status']}"
        return text

    def _eta(self, st) -> str:
        start = st["rate_from"]
        if start is None or st["step"] <= start[0]:
            return "..."
        rate = (st["step"] - start[0]) / max(time.time() - start[1], 1e-6)
        return _duration((st["total"] - st["step"]) / rate)

    def _update(self, name: str, now: float) -> None:
        with self.lock:
            self._show(name, final=False)

    def _show(self, name: str, *, final: bool) -> None:
        if self.tty:
            self._clear()
            self._redraw()
            return
        st, now = self.state[name], time.time()
        if final or now - st["printed"] >= self.every:
            st["printed"] = now
            self.stream.write(f"[demo] {self.line(name)}\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F")  # up to the first live line
            self.stream.write("\x1b[J")  # and clear from there down
        self.drawn = 0

    def _redraw(self) -> None:
        if not self.tty:
            self.stream.flush()
            return
        import shutil

        width = max(shutil.get_terminal_size((100, 24)).columns - 1, 20)  # a wrapped line would
        for name in self.state:  # take two rows and break the redraw
            self.stream.write(self.line(name)[:width] + "\n")
        self.drawn = len(self.state)
        self.stream.flush()


def _training_curve(log, phase1_iters: int) -> dict:
    """{"phase1": {it: multi-hot loss}, "phase2": {it: next-token loss}} from a parsed log."""
    curve = {"phase1": {}, "phase2": {}}
    for it in sorted(log.train):
        row = log.train[it]
        if it <= phase1_iters and "tst loss" in row:
            curve["phase1"][it] = row["tst loss"]
        else:
            curve["phase2"][it] = log.loss(it)
    return curve


def plot_curves(runs: dict, boundary: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[demo] matplotlib is not installed: skipping loss_curves.png", file=sys.stderr)
        return False
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"baseline": "tab:blue", "tst": "tab:orange"}
    for name, run in runs.items():
        color = colors.get(name)
        its = sorted(run["valid"])
        losses = [run["valid"][i] for i in its]
        by_step.plot(its, losses, marker="o", markersize=3, color=color,
                     label=f"{name}: held-out next-token loss")
        by_tokens.plot([run["text_tokens_at"][i] for i in its], losses, marker="o", markersize=3,
                       color=color, label=name)
        train = run.get("train_loss", {})
        if train.get("phase1") and run["bag_size"] > 1:
            p1 = sorted(train["phase1"])
            by_step.plot(p1, [train["phase1"][i] for i in p1], color=color, linestyle=":", linewidth=1.5,
                         label=f"{name}: phase-1 training loss (multi-hot: mean CE of the next bag's "
                               f"{run['bag_size']} tokens)")
        rest = dict(train.get("phase2", {}))
        if run["bag_size"] == 1:
            rest.update(train.get("phase1", {}))
        if rest:
            p2 = sorted(rest)
            by_step.plot(p2, [rest[i] for i in p2], color=color, linestyle="--", linewidth=0.8, alpha=0.7,
                         label=f"{name}: next-token training loss")
    by_step.axvline(boundary, color="gray", linestyle="--", label="TST phase 1 -> 2")
    by_step.set(xlabel="iteration", ylabel="loss (nats)", title="vs step")
    by_tokens.set(xlabel="text tokens trained on", ylabel="held-out next-token loss (nats)",
                  title="held-out loss vs tokens")
    by_tokens.set_xscale("log")
    for ax in (by_step, by_tokens):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=7, loc="upper right")
    by_tokens.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.07 if boundary else 0, 1, 1))
    if boundary:
        fig.text(0.01, 0.01, "In phase 1 (iterations 1-%d) TST trains on bag means, not single tokens: its held-out "
                 "next-token loss stays flat until phase 2, while its phase-1 training loss (the multi-hot loss "
                 "it optimises, dotted) falls.\nThat is learning; the next-token skill follows in phase 2." % boundary,
                 ha="left", va="bottom", fontsize=8, color="dimgray")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _run_one(name: str, argv: list[str], *, out: Path, nproc: int, env: dict, progress: Progress):
    """One run through `nemo-tst pretrain`'s driver; its trainer output only in its log."""
    from nemo_tst.training.driver import run

    log_file = out / f"{name}.log"

    def into_log(text: str) -> None:
        with open(log_file, "a") as log:
            log.write(text + "\n")

    start = time.time()
    progress.set_status(name, "starting (imports, model, data)")
    try:
        plan = run(argv, nproc=nproc, log_file=log_file, on_line=lambda line: progress.feed(name, line),
                   say=into_log, env=env)
    except BaseException:
        progress.set_status(name, "FAILED")
        raise
    progress.set_status(name, "done")
    return plan, time.time() - start


def _finished(save: Path, iterations: int) -> bool:
    from nemo_tst.training.driver import latest_iteration

    return latest_iteration(save / "phase2") == iterations


def run_demo(out: Path, *, size_name: str, bag_size: int, phase1_fraction: float, nproc: int = 1,
             side_by_side: Optional[bool] = None, stream=None) -> dict:
    import torch

    from nemo_tst.training.logs import parse_training_log

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

    specs = {"baseline": 1, "tst": bag_size}
    previous = {}
    if (out / "summary.json").is_file():
        previous = json.loads((out / "summary.json").read_text()).get("runs", {})

    say(f"[demo] baseline: s=1, {N} iterations of next-token training in one launch; log {out / 'baseline.log'}")
    say(f"[demo] tst: s={bag_size}, phase 1 = iterations 1-{n1} (bags of {bag_size} tokens), phase 2 = "
        f"{n1 + 1}-{N} (next-token); log {out / 'tst.log'}")
    say(f"[demo] {'side by side, ' + env['OMP_NUM_THREADS'] + ' thread(s) each' if side_by_side else 'one after the other'}"
        f"; Megatron's own output goes to the logs")
    progress = Progress({name: {"phase1_iters": n1 if s > 1 else 0} for name, s in specs.items()}, stream)
    results, errors = {}, {}
    train_start = time.time()

    def job(name):
        if _finished(out / name, N):
            progress.set_status(name, "complete (reused)")
            return name, None
        return name, _run_one(name, argvs[name], out=out, nproc=nproc, env=env, progress=progress)

    with ThreadPoolExecutor(max_workers=2 if side_by_side else 1) as pool:
        futures = [pool.submit(job, name) for name in specs]
        for future in futures:
            try:
                name, result = future.result()
                results[name] = result
            except Exception as err:  # the other run keeps going; report after both
                errors[len(errors)] = err
    progress.close()
    train_seconds = time.time() - train_start
    if errors:
        bugs = [err for err in errors.values() if not is_user_error(err)]
        if bugs:  # with its traceback
            raise bugs[0]
        raise RunFailed("; ".join(str(e) for e in errors.values()))

    from nemo_tst.training.arguments import plan_from_args
    from nemo_tst.training.driver import parse_megatron_args

    runs = {}
    for name, s in specs.items():
        log_file = out / f"{name}.log"
        log = parse_training_log(log_file.read_text())
        if not log.valid:
            raise RunFailed(f"no validation loss found in {log_file}")
        plan = plan_from_args(parse_megatron_args(argvs[name]))
        final_it = max(log.valid)
        wall = results[name][1] if results.get(name) else previous.get(name, {}).get("wall_seconds", 0.0)
        runs[name] = {
            "bag_size": s,
            "phase1_iters": plan.phase1_iters if s > 1 else 0,
            "valid": log.valid,
            "final_valid_loss": log.valid[final_it],
            "train_loss": _training_curve(log, plan.phase1_iters if s > 1 else 0),
            "text_tokens": plan.text_tokens_after(plan.train_iters),
            "text_tokens_at": {it: plan.text_tokens_after(it) for it in log.valid},
            "wall_seconds": round(wall, 1),
        }

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

    say("")
    say(f"{'run':10} {'final held-out loss':>20} {'text tokens':>14} {'wall time':>10}")
    for name, r in runs.items():
        say(f"{name:10} {r['final_valid_loss']:>20.4f} {r['text_tokens']:>14,} {r['wall_seconds']:>9.0f}s")
    say(f"TST - baseline: {summary['tst_minus_baseline']:+.4f} nats (final held-out next-token loss, "
        f"{N} steps each{', side by side' if side_by_side else ''}). {summary['verdict']}")
    say(f"total {_duration(summary['seconds']['total'])} (data {_duration(data_seconds)}, training "
        f"{_duration(train_seconds)}); wrote {out / 'summary.json'}"
        + (f" and {out / 'loss_curves.png'}" if plotted else ""))
    return summary


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
    from nemo_tst.errors import ArgumentParser, positive_int

    parser = ArgumentParser(prog="nemo-tst demo", description=__doc__.split("\n\n")[0])
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
