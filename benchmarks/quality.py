"""Quality at equal FLOPs through the real two-phase trainer: TST vs baselines of 1, 1.25, 1.5x.

All runs share the model, L, global batch, data, optimizer and warm-up; each has its own WSD
schedule spanning its own length (decay over its last 10%). Each run's arguments are a recipe's
`megatron_args()` (conf/recipes, the --size preset's recipe and overrides) with the
run's length, s, r and paths as overrides (`megatron_argv`). Runs (N = --steps):

    baseline        s = 1 for N steps             (FLOPs of N steps)
    tst_s4          s = 4 for the first r*N steps, then next-token training (same FLOPs)
    baseline_x1.25  s = 1 for 1.25 N steps        (25% more FLOPs)
    baseline_x1.5   s = 1 for 1.5 N steps         (50% more FLOPs)
    [tst_s2, tst_s8 with --extra-bag-sizes 2 8]

Each goes through `nemo-tst pretrain`'s driver (Megatron-LM's trainer, datasets and
checkpoints), several at once on one GPU (--concurrency) with a live progress line each
(`nemo_tst.demo.runs`, the demo's harness): the small models used here leave the GPU idle
between kernels, so concurrent runs share it well. A run's trainer output is in
<work-dir>/N<N>/<run>/train.log.

Seeds (--seeds, default 3): every run above trains once per seed; a seed sets both the initial
weights and the data order, and each TST run is paired with the baselines of its own seed.
Every evaluation scores --eval-tokens held-out tokens (default 65,536), the same samples at
every evaluation of a run and in every run of a seed.

Reported, per seed: the final held-out next-token loss of each run, TST minus the equal-FLOPs
baseline, and the iso-loss speedup below. Over seeds (`nemo_tst.demo.stats`): the mean paired
difference TST minus baseline with its standard deviation and 95% interval, and the iso-loss
speedup's mean and 95% interval; a difference whose interval contains zero is reported as "no
measurable difference". The iso-loss speedup: the baseline's final loss as a function of its length, f(N), f(1.25N), f(1.5N), is
interpolated linearly between neighbouring lengths to find the steps n* with f(n*) = TST's
final loss; speedup = n* / N (target >= 1.25). Beyond 1.5N it is extrapolated from the last
two points (flagged); above f(N) it is reported as < 1.

Data: the Python sources of this interpreter's standard library and every site-packages
directory on sys.path (`nemo_tst.data.build_stdlib_corpus` with `extra_roots`: a file whose
content is already taken is left out; 1% of the files held out), a byte-level BPE trained on
the first --bpe-bytes of the training files, Megatron indexed datasets (`nemo_tst.demo.data`).

Budget: without --steps, the runs are first calibrated (a short baseline run per concurrent
slot measures the milliseconds per iteration and the process start-up cost), then N is the
largest multiple of 80 whose runs finish within --budget-minutes. The chosen N is kept in
<work-dir>/plan_<size>.json, so a rerun resumes the same runs (finished runs are skipped;
unfinished ones continue from their last checkpoint). Pass --steps N to fix it. With
--prepare-only the script builds the data and calibrates, choosing N for a later command that gets
the whole --budget-minutes for training: where one command may run only so long, one command
prepares and the next trains.

Stopping: Ctrl-C or a TERM to the process group (as `timeout` sends) stops the runs; they keep
their checkpoints, and the same command again resumes them.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from nemo_tst.demo.data import data_overrides, prepare_data  # noqa: E402
from nemo_tst.demo.plot import plot_iso_loss  # noqa: E402
from nemo_tst.demo.progress import Progress  # noqa: E402
from nemo_tst.demo.results import read_run, steps_to_reach  # noqa: E402
from nemo_tst.demo.runs import finished, side_by_side, train  # noqa: E402
from nemo_tst.demo.stats import paired_difference, speedup_interval, verdict  # noqa: E402

# Model and schedule presets: a recipe (conf/recipes/<recipe>.yaml) and overrides of
# it; model.vocab_size is the BPE's size. corpus_bytes and steps are the benchmark's own.
SIZES = {
    # The GPU default: small enough that 4 concurrent runs of ~8k steps fit in minutes.
    "budget": dict(recipe="tst_demo_gpu", overrides=[
        "model.num_layers=6", "model.hidden_size=384", "model.num_attention_heads=6",
        "model.ffn_hidden_size=1024", "model.seq_length=256", "model.vocab_size=16384",
        "training.lr=1.5e-3", "training.min_lr=1.5e-4", "training.eval_iters=20"],
        corpus_bytes=None),
    # The GPU demo's model with a larger BPE: about 114 ms a step on an H100 (megatron-core 0.19,
    # local spec, bf16), for budgets of hours rather than minutes.
    "note": dict(recipe="tst_demo_gpu", overrides=["model.vocab_size=16384", "training.eval_iters=20"],
                 corpus_bytes=None),
    # The CPU demo's model (conf/demo.yaml "cpu"): with --steps 8000 the four runs take about 70
    # minutes on 2 cores, long enough for the recovery phase; the GPU sizes are out of reach there.
    "cpu": dict(recipe="tst_demo_cpu", overrides=[], corpus_bytes=80_000_000),
    # CPU smoke test: checks the pipeline, not the method (40 steps cannot show TST's gain).
    "cpu-smoke": dict(recipe="tst_tiny", overrides=["parallel.micro_batch_size=8"],
                      corpus_bytes=3_000_000, steps=40, eval_tokens=2048),
}



# ----- data and runs ---------------------------------------------------------------------------


def data_dir(work: Path, *, vocab: int, max_bytes) -> Path:
    return work / f"data_v{vocab}_{'all' if max_bytes is None else int(max_bytes)}"


def prepare_code_data(work: Path, *, vocab: int, max_bytes, bpe_bytes: int, workers: int) -> dict:
    """The standard library and site-packages sources -> BPE -> <data dir>/code_train,
    code_valid (`nemo_tst.demo.data.prepare_data`); reused when already done."""
    from nemo_tst.data import build_stdlib_corpus, site_packages_roots

    def corpus(out: Path):
        return build_stdlib_corpus(out, max_bytes=max_bytes, valid_fraction=0.01,
                                   extra_roots=site_packages_roots())

    return prepare_data(data_dir(work, vocab=vocab, max_bytes=max_bytes), corpus, vocab_size=vocab,
                        prefix="code", workers=workers, bpe_bytes=bpe_bytes,
                        say=lambda text: print(f"[quality] {text}", flush=True))


def eval_interval(steps: list[int], longest_gap: int) -> int:
    """The largest divisor of every run length that is at most `longest_gap`, so that every run
    is evaluated at its last step."""
    g = 0
    for s in steps:
        g = math.gcd(g, s)
    return max(d for d in range(1, g + 1) if g % d == 0 and d <= max(longest_gap, 1))


def run_overrides(data: dict, *, steps: int, bag_size: int, r: float, warmup: int, eval_every: int,
                  save_every: int, save: Path, cpu: bool, attention, log_every=None, seed: Optional[int] = None,
                  eval_iters: Optional[int] = None) -> list[str]:
    """The overrides of one run on top of the size's recipe: its length and schedule cadence,
    s and r, seed, held-out batches per evaluation, data, checkpoints, device."""
    # Megatron caches dataset indices beside the data by default; runs started together
    # with the same dataset settings would write and read the same files at once.
    extra = ["--data-cache-path", str(save.parent / "index_cache")]
    if attention:
        extra += ["--tst-attention", attention]
    return [
        f"training.train_iters={steps}", f"training.warmup_iters={warmup}",
        f"training.eval_interval={eval_every}", f"training.save_interval={save_every}",
        f"training.log_interval={log_every or max(min(eval_every, 100) // 2, 1)}",
        f"tst.bag_size={bag_size}", f"tst.phase1_fraction={r}",
        *([f"training.seed={seed}"] if seed is not None else []),
        *([f"training.eval_iters={eval_iters}"] if eval_iters else []),
        *data_overrides(data, data_dir=Path(data["tokenizer"]).parent, cpu=cpu, run_dir=save,
                        extra_args=extra),
    ]


def megatron_argv(recipe, data: dict, **run) -> list[str]:
    """One run's `nemo-tst pretrain` arguments: the size's recipe with `run_overrides(**run)`."""
    from nemo_tst.recipes.catalog import apply_overrides

    return apply_overrides(recipe, run_overrides(data, **run)).megatron_args()


def size_recipe(size_name: str, *, vocab=None, lr=None):
    """The --size preset's recipe, with --vocab and --lr (min LR lr/10) applied."""
    from nemo_tst.recipes.catalog import load_recipe

    preset = SIZES[size_name]
    overrides = list(preset["overrides"])
    if vocab:
        overrides.append(f"model.vocab_size={vocab}")
    if lr:
        overrides += [f"training.lr={lr}", f"training.min_lr={lr / 10}"]
    return load_recipe(preset["recipe"], overrides=overrides)


_STOP = threading.Event()  # set by a signal: start no further phase or run


def _stop_runs(signum, frame):
    """TERM/INT: start nothing more and stop. The runs' trainers are in this process group and
    get the same signal from `timeout` or Ctrl-C; they keep their checkpoints, a rerun resumes."""
    _STOP.set()
    raise SystemExit(f"[quality] stopped by signal {signum}; rerun the same command to resume")


def run_one(name: str, argv: list[str], run_dir: Path, steps: int, deadline, progress: Progress,
            threads=None) -> dict:
    """One run (`nemo_tst.demo.runs.train`, its checkpoints in run_dir/ckpt), each phase with
    Megatron's --exit-duration-in-mins from the time left when it starts. Returns its status,
    never raises: the other runs and the report go on."""
    save = run_dir / "ckpt"
    if finished(save, steps):
        progress.set_status(name, "complete (reused)")
        return {"status": "done (reused)", "seconds": 0.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(C.REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)

    def into_driver_out(text: str) -> None:
        with open(run_dir / "driver.out", "a") as out:
            out.write(text + "\n")

    t0, why = time.time(), ""
    progress.note(f"[quality] {name}: start ({steps} steps), log {run_dir / 'train.log'}")
    try:
        train(name, argv, log_file=run_dir / "train.log", progress=progress, env=env,
              say=into_driver_out, deadline=deadline, stop=_STOP)
    except Exception as err:  # noqa: BLE001 - reported as the run's status
        why = str(err)[:200]
    seconds = round(time.time() - t0, 1)
    status = "done" if finished(save, steps) else f"incomplete (rerun to resume): {why}"
    progress.note(f"[quality] {name}: {status} in {seconds:.0f}s")
    return {"status": status, "seconds": seconds}


def run_all(jobs: list[tuple], concurrency: int) -> list[dict]:
    """`run_one` for each job (name, argv, run_dir, steps, deadline, threads), `concurrency` at a
    time, each with its progress line; their statuses in the jobs' order."""
    def phase1_iters(argv):
        from nemo_tst.training.arguments import parse_megatron_args, plan_from_args

        plan = plan_from_args(parse_megatron_args(argv))
        return plan.phase1_iters if plan.settings.bag_size > 1 else 0

    progress = Progress({job[0]: {"phase1_iters": phase1_iters(job[1])} for job in jobs}, tag="quality")
    by_name = {job[0]: job for job in jobs}
    try:
        statuses = side_by_side(lambda name: run_one(*by_name[name][:5], progress, by_name[name][5]),
                                list(by_name), workers=concurrency)
    finally:
        progress.close()
    return [statuses[job[0]] for job in jobs]


_ITER_MS = re.compile(r"elapsed time per iteration \(ms\): ([\d.]+)")


def calibrate(work: Path, recipe, data: dict, *, slots: int, cpu: bool, attention, steps: int = 150,
              threads=None) -> dict:
    """Milliseconds per iteration with `slots` runs sharing the device, and the seconds a run
    spends outside its iterations (start-up, data indices, saves)."""
    jobs = []
    for i in range(slots):
        d = work / f"calibrate_{i}"
        shutil.rmtree(d, ignore_errors=True)  # a fresh measurement, not a resumed one
        argv = megatron_argv(recipe, data, steps=steps, bag_size=1, r=0.5, warmup=10, eval_every=steps,
                             save_every=steps, save=d / "ckpt", cpu=cpu, attention=attention, log_every=10)
        jobs.append((f"calibrate_{i}", argv, d, steps, None, threads))
    t0 = time.time()
    statuses = run_all(jobs, slots)
    wall = time.time() - t0
    per_iter = []
    for _, _, d, _, _, _ in jobs:
        values = [float(v) for v in _ITER_MS.findall((d / "train.log").read_text())]
        per_iter += values[2:] if len(values) > 3 else values[-1:]
    if not per_iter or any(not s["status"].startswith("done") for s in statuses):
        raise SystemExit(f"calibration failed: {statuses}; see {work}/calibrate_*/train.log")
    ms = sorted(per_iter)[len(per_iter) // 2]
    overhead = max(wall - steps * ms / 1e3, 0.0) / 2  # each calibration run had two phases
    return {"ms_per_iteration": ms, "seconds_per_phase_startup": overhead, "slots": slots,
            "wall_seconds": wall}


def choose_steps(cal: dict, multipliers: list[float], runs: int, concurrency: int, seconds: float) -> int:
    """Largest N (multiple of 80) with estimated wall time within `seconds`:
    2 phase start-ups per wave of runs + the iterations of the longest queue, x1.1 for
    evaluation and checkpoints."""
    waves = math.ceil(runs / concurrency)
    work_per_n = max(max(multipliers), sum(multipliers) / concurrency)
    avail = seconds - 2 * waves * cal["seconds_per_phase_startup"]
    n = int(avail / (1.1 * work_per_n * cal["ms_per_iteration"] / 1e3))
    return max(80, n // 80 * 80)


# ----- results ---------------------------------------------------------------------------------


def iso_loss_speedup(baselines: list[tuple[int, float]], target: float, n: int) -> tuple:
    """(speedup, how): steps the baseline needs to reach `target`, over n."""
    pts = sorted(baselines)
    if len(pts) < 2:
        return None, "needs >= 2 finished baselines"
    if target >= pts[0][1]:
        return None, f"< {pts[0][0] / n:.2f} (TST above the {pts[0][0]}-step baseline)"
    for (s0, f0), (s1, f1) in zip(pts, pts[1:]):
        if f1 <= target <= f0 and f0 != f1:
            return (s0 + (f0 - target) / (f0 - f1) * (s1 - s0)) / n, "interpolated"
    (s0, f0), (s1, f1) = pts[-2], pts[-1]
    if f1 >= f0:
        return None, f"> {s1 / n:.2f} (baseline not improving with length)"
    return (s1 + (f1 - target) / (f0 - f1) * (s1 - s0)) / n, f"extrapolated beyond {s1 / n:.2f}x"


def _at(curve: dict, it: float):
    """The held-out loss at iteration `it`, linear between evaluated iterations (None outside)."""
    its = sorted(curve)
    if not its or it < its[0] or it > its[-1]:
        return None
    for a, b in zip(its, its[1:] + its[-1:]):
        if a <= it <= b:
            return curve[a] if a == b else curve[a] + (it - a) / (b - a) * (curve[b] - curve[a])


def head_start(tst: dict, base: dict, n1: int) -> list[dict]:
    """Where TST's gap comes from, at each evaluation of its phase 2 (iteration n1 + k):

    head_start = baseline(k) - TST(n1 + k): TST against a fresh start that has had as many
                 next-token steps as TST's phase 2 (> 0: phase 1 left TST ahead);
    gap        = TST(n1 + k) - baseline(n1 + k): against the baseline at the same step and
                 FLOPs (< 0: TST ahead)."""
    rows = []
    for it in sorted(i for i in tst if i > n1):
        fresh, same = _at(base, it - n1), _at(base, it)
        rows.append({"iteration": it, "k": it - n1,
                     "head_start": None if fresh is None else fresh - tst[it],
                     "gap": None if same is None else tst[it] - same})
    return rows


def parse_options(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(parser, default_out="benchmarks/results/quality.json")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/work/quality"),
                        help="data, checkpoints and logs (large; keep it outside --out's folder)")
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="model preset: budget (CUDA default), note, cpu, cpu-smoke (CPU default)")
    parser.add_argument("--steps", type=int, default=None, help="N; default: calibrated to the budget")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="wall-clock for everything this script does, data preparation included "
                             "(0: no deadline; then give --steps)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per run (each sets the initial weights and the data order); "
                             "intervals need 2 or more")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="held-out tokens per evaluation (default 65,536; cpu-smoke: 2,048)")
    parser.add_argument("--bag-size", type=int, default=4)
    parser.add_argument("--phase1-fraction", type=float, default=0.3)
    parser.add_argument("--extra-bag-sizes", type=int, nargs="*", default=[], help="e.g. 2 8")
    parser.add_argument("--baseline-multipliers", type=float, nargs="*", default=[1.25, 1.5],
                        help="longer baselines for the iso-loss speedup (none: baseline vs TST only)")
    parser.add_argument("--concurrency", type=int, default=None, help="runs at once (CUDA: all, CPU: 2)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the data and calibrate N (for a later command with the same "
                             "--budget-minutes and --work-dir), then stop")
    parser.add_argument("--data-only", action="store_true",
                        help="build the data (corpus, BPE, indexed datasets) in --work-dir, then stop; "
                             "needs no GPU (run_all.sh --gpu-window runs it beside the microbenchmarks)")
    parser.add_argument("--reserve-seconds", type=float, default=30.0,
                        help="seconds of the budget left unplanned when N is calibrated")
    parser.add_argument("--corpus-bytes", type=float, default=None, help="cap on the corpus size")
    parser.add_argument("--bpe-bytes", type=float, default=32e6, help="text the BPE is trained on")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (budget: 16384)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--attention", choices=["sdpa", "unfused"], default=None,
                        help="--tst-attention for the trainer, when it has that option")
    return parser.parse_args(argv)


def trainer_attention(requested) -> tuple:
    """(the --tst-attention to pass, None for the trainer's default; the attention used, in words)."""
    from nemo_tst.training.arguments import add_tst_arguments

    probe = argparse.ArgumentParser()
    add_tst_arguments(probe)
    has_attention_flag = any("--tst-attention" in a.option_strings for a in probe._actions)
    attention = requested if has_attention_flag else None  # None: the trainer's default
    if requested and not has_attention_flag:
        print("[quality] this trainer has no --tst-attention option: using its default", file=sys.stderr)
    used = attention or (f"{probe.get_default('tst_attention')} (trainer default)"
                         if has_attention_flag else "unfused (local spec)")
    return attention, used


def steps_for_budget(opts, *, work: Path, size_name: str, recipe, data: dict, cpu: bool, attention,
                     n_runs: int, concurrency: int, threads, deadline) -> tuple:
    """(N, calibration): given, preset (CPU smoke), remembered from an earlier command, or
    calibrated to what is left of the budget."""
    plan_file = work / f"plan_{size_name}.json"
    if opts.steps:
        return opts.steps, None
    if SIZES[size_name].get("steps") and cpu:
        return SIZES[size_name]["steps"], None
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        print(f"[quality] reusing N = {saved['steps']} from {plan_file}", flush=True)
        return saved["steps"], saved.get("calibration")
    if deadline is None:
        raise SystemExit("give --steps N or a --budget-minutes to calibrate N for")
    calibration = calibrate(work, recipe, data, slots=concurrency, cpu=cpu, attention=attention,
                            threads=threads)
    mults = [1.0, 1.0, *opts.baseline_multipliers, *[1.0] * len(opts.extra_bag_sizes)] * opts.seeds
    # With --prepare-only, plan for a later command that starts with data and plan ready.
    seconds = opts.budget_minutes * 60 if opts.prepare_only else deadline - time.time()
    N = choose_steps(calibration, mults, n_runs, concurrency, seconds - opts.reserve_seconds)
    print(f"[quality] calibration: {calibration['ms_per_iteration']:.1f} ms/iteration with "
          f"{concurrency} runs sharing the device, {calibration['seconds_per_phase_startup']:.0f}s "
          f"per phase start-up -> N = {N}", flush=True)
    plan_file.write_text(json.dumps({"steps": N, "calibration": calibration}, indent=2))
    return N, calibration


def run_lengths(opts, N: int) -> dict:
    """{run name: (s, steps)}: the baseline, the TST runs, the longer baselines."""
    runs = {"baseline": (1, N)}
    for s in [opts.bag_size, *opts.extra_bag_sizes]:
        runs[f"tst_s{s}"] = (s, N)
    for m in opts.baseline_multipliers:
        steps = round(m * N)
        if abs(steps - m * N) > 1e-9:
            raise SystemExit(f"{m} x --steps {N} is not a whole number of steps: pick N a multiple of 80")
        runs[f"baseline_x{m:g}"] = (1, steps)
    return runs


def iso_loss_summary(results: dict, N: int) -> tuple[dict, list]:
    """({TST run: its comparison with the baselines}, the baselines' (steps, final loss))."""
    base = results["baseline"]["final_loss"]
    points = [(r["steps"], r["final_loss"]) for r in results.values()
              if r["bag_size"] == 1 and r["final_loss"] is not None]
    summary = {}
    for name, r in results.items():
        if r["bag_size"] > 1 and r["final_loss"] is not None:
            speedup, how = iso_loss_speedup(points, r["final_loss"], N)
            summary[name] = {
                "head_start": head_start(r["valid"], results["baseline"]["valid"], r["phase1_iters"]),
                "minus_baseline": None if base is None else r["final_loss"] - base,
                "iso_loss_speedup": speedup, "speedup_how": how,
                "reaches_baseline_final_at": steps_to_reach(r["valid"], base),
            }
    return summary, points


def seed_summary(by_seed: dict, N: int) -> dict:
    """{TST run: its comparison over seeds}: the paired difference from the baseline of the
    same seed and the iso-loss speedup against the same seed's baseline lengths, each with
    its 95% interval (`nemo_tst.demo.stats`); seeds with an unfinished run are left out."""
    names = sorted({name for results in by_seed.values() for name, r in results.items() if r["bag_size"] > 1})
    out = {}
    for name in names:
        tst, base, families = [], [], []
        for results in by_seed.values():
            if results.get(name, {}).get("final_loss") is None or results["baseline"]["final_loss"] is None:
                continue
            tst.append(results[name]["final_loss"])
            base.append(results["baseline"]["final_loss"])
            families.append([(r["steps"], r["final_loss"]) for r in results.values()
                             if r["bag_size"] == 1 and r["final_loss"] is not None])
        row = {"seeds": len(tst), "minus_baseline": None, "verdict": None, "iso_loss_speedup": None,
               "seeds_outside_baseline_range": None}
        if len(tst) >= 2:
            diff = paired_difference(tst, base)
            speedup, outside = speedup_interval(families, tst, N)
            row.update(minus_baseline=vars(diff), verdict=verdict(diff),
                       iso_loss_speedup=None if speedup is None else vars(speedup),
                       seeds_outside_baseline_range=outside)
        out[name] = row
    return out


def print_seed_summary(title: str, over_seeds: dict) -> str:
    """The comparison over seeds as a table; returns it as markdown."""
    rows = []
    for name, row in over_seeds.items():
        d, sp = row["minus_baseline"], row["iso_loss_speedup"]
        rows.append([name, row["seeds"],
                     "-" if d is None else f"{d['mean']:+.4f}", "-" if d is None else f"{d['sd']:.4f}",
                     "-" if d is None else f"[{d['low']:+.4f}, {d['high']:+.4f}]",
                     row["verdict"] or "needs 2+ finished seeds",
                     "-" if sp is None else f"{sp['mean']:.2f}x [{sp['low']:.2f}, {sp['high']:.2f}]",
                     "-" if row["seeds_outside_baseline_range"] is None else row["seeds_outside_baseline_range"]])
    return C.print_table(title, ["run", "seeds", "TST - base (mean)", "sd", "95% interval", "verdict",
                                 "iso-loss speedup [95%]", "seeds outside the baselines"], rows)


def print_report(title: str, results: dict, summary: dict) -> str:
    """The table, each TST run against the targets, and where its gap comes from; returns the
    table as markdown."""
    rows = []
    for name, r in results.items():
        sm = summary.get(name, {})
        rows.append([name, r["bag_size"], r["steps"], f"{r['text_tokens']:,}",
                     C.fmt(r["final_loss"], ".4f"),
                     C.fmt(sm.get("minus_baseline"), "+.4f") if sm else "-",
                     (C.fmt(sm.get("iso_loss_speedup"), ".2f") + "x" if sm.get("iso_loss_speedup")
                      else sm.get("speedup_how", "-")) if sm else "-",
                     f"{r['wall_seconds']:.0f}", r["status"].split(":")[0]])
    md = C.print_table(title, ["run", "s", "steps", "text tokens", "final loss", "TST - base",
                               "iso-loss speedup", "wall s", "status"], rows)
    for name, sm in summary.items():
        d, sp = sm["minus_baseline"], sm["iso_loss_speedup"]
        print(f"{name}: TST - baseline = {C.fmt(d, '+.4f')} nats; iso-loss speedup "
              f"{'-' if sp is None else f'{sp:.2f}x'} ({sm['speedup_how']})")
    for name, sm in summary.items():
        rows_k = [h for h in sm["head_start"] if h["head_start"] is not None]
        if rows_k:
            shown = rows_k[:: max(1, len(rows_k) // 6)] + rows_k[-1:]
            print(f"{name}, phase 2 vs a fresh start with as many next-token steps (head start, "
                  f"> 0: TST ahead) and vs the baseline at the same step (gap, < 0: TST ahead):")
            for h in dict((h["k"], h) for h in shown).values():
                print(f"  iteration {h['iteration']:>6} (k = {h['k']:>5}): head start "
                      f"{h['head_start']:+.4f}, gap {C.fmt(h['gap'], '+.4f')}")
    return md


def main(argv=None) -> dict:
    opts = parse_options(argv)
    device = C.resolve_device(opts.device)
    cpu = device.type == "cpu"
    start = time.time()
    deadline = start + opts.budget_minutes * 60 if opts.budget_minutes else None
    size_name = opts.size or ("cpu-smoke" if cpu else "budget")
    recipe = size_recipe(size_name, vocab=opts.vocab, lr=opts.lr)
    max_bytes = opts.corpus_bytes if opts.corpus_bytes is not None else SIZES[size_name]["corpus_bytes"]
    if opts.seeds < 1:
        raise SystemExit(f"--seeds {opts.seeds}: give 1 or more (intervals need 2; comparisons 3)")
    n_runs = (2 + len(opts.baseline_multipliers) + len(opts.extra_bag_sizes)) * opts.seeds
    concurrency = opts.concurrency or (min(2, n_runs) if cpu else n_runs)
    threads = max(1, (os.cpu_count() or 1) // concurrency) if cpu else None
    work = opts.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    attention, attention_used = trainer_attention(opts.attention)

    data = prepare_code_data(work, vocab=recipe.model.vocab_size, max_bytes=max_bytes,
                             bpe_bytes=int(opts.bpe_bytes), workers=max(os.cpu_count() or 1, 1))
    if opts.data_only:
        print(f"[quality] data ready in {work} ({time.time() - start:.0f}s)", flush=True)
        return {"data": data}
    # From here on this process trains: a signal stops it and its runs. (Set after the data
    # step: its worker pool must keep the default SIGTERM behaviour.)
    signal.signal(signal.SIGTERM, _stop_runs)
    signal.signal(signal.SIGINT, _stop_runs)
    N, calibration = steps_for_budget(opts, work=work, size_name=size_name, recipe=recipe, data=data, cpu=cpu,
                                      attention=attention, n_runs=n_runs, concurrency=concurrency,
                                      threads=threads, deadline=deadline)
    if opts.prepare_only:
        print(f"[quality] prepared: data in {work}, N = {N} ({work / f'plan_{size_name}.json'})")
        return {"steps": N, "data": data, "calibration": calibration}

    runs = run_lengths(opts, N)
    lengths = sorted({steps for _, steps in runs.values()})
    every = eval_interval(lengths, N // 8)
    save_every = every * max(1, (N // 3) // every) if not cpu else N
    warmup = max(1, min(300, N // 20))
    tokens_per_batch = recipe.training.global_batch_size * recipe.model.seq_length
    eval_tokens = opts.eval_tokens or SIZES[size_name].get("eval_tokens", 65_536)
    eval_iters = math.ceil(eval_tokens / tokens_per_batch)
    seeds = [recipe.training.seed + k for k in range(opts.seeds)]
    jobs, keys = [], []  # keys: each job's (seed, run name)
    for seed in seeds:
        for name, (s, steps) in runs.items():
            run_dir = work / f"N{N}" / f"seed{seed}" / name
            argv_run = megatron_argv(recipe, data, steps=steps, bag_size=s, r=opts.phase1_fraction,
                                     warmup=warmup, eval_every=every, save_every=save_every,
                                     save=run_dir / "ckpt", cpu=cpu, attention=attention, seed=seed,
                                     eval_iters=eval_iters)
            jobs.append((f"{name}/seed{seed}", argv_run, run_dir, steps, deadline, threads))
            keys.append((seed, name))
    statuses = run_all(jobs, concurrency)

    by_seed, phase1_end = {seed: {} for seed in seeds}, {}
    for (seed, name), (_, argv_run, run_dir, steps, _, _), status in zip(keys, jobs, statuses):
        run = read_run(run_dir / "train.log", argv_run)
        by_seed[seed][name] = {
            "bag_size": run["bag_size"], "steps": steps, "phase1_iters": run["phase1_iters"],
            "status": status["status"], "wall_seconds": status["seconds"],
            "final_loss": run["valid"].get(steps), "valid": run["valid"], "text_tokens": run["text_tokens"],
        }
        if run["bag_size"] > 1 and seed == seeds[0]:
            phase1_end[name] = run["phase1_iters"]
    per_seed = {seed: iso_loss_summary(results, N) for seed, results in by_seed.items()}
    over_seeds = seed_summary(by_seed, N)

    env = C.environment(device)
    model = recipe.model
    title = (f"quality at equal FLOPs: {model.num_layers} layers, hidden {model.hidden_size}, "
             f"{model.num_attention_heads} heads, ffn {model.ffn_hidden_size}, V {data['vocab_size']}, "
             f"L {model.seq_length}, global batch {recipe.training.global_batch_size}, {attention_used} attention, N = {N}, TST r = "
             f"{opts.phase1_fraction}, held-out "
             f"next-token loss every {every} steps; {env['device']}")
    md = "\n\n".join(print_report(f"{title}, seed {seed}", by_seed[seed], per_seed[seed][0]) for seed in seeds)
    md += "\n\n" + print_seed_summary(f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
                                       f"{eval_iters * tokens_per_batch:,} held-out tokens per evaluation",
                                       over_seeds)
    png = opts.out.with_name(opts.out.stem + "_loss_curves.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plotted = plot_iso_loss(by_seed[seeds[0]], phase1_end, per_seed[seeds[0]][1], png)
    payload = {"benchmark": "quality", "command": C.command_line(), "env": env,
               "config": {k: v for k, v in vars(opts).items() if k != "out"} | {
                   "size_name": size_name,
                   "size": {"recipe": recipe.name, "overrides": SIZES[size_name]["overrides"],
                            "vocab": data["vocab_size"], "lr": recipe.training.lr},
                   "steps": N, "eval_interval": every, "seeds": seeds,
                   "eval_iters": eval_iters, "eval_tokens": eval_iters * tokens_per_batch,
                   "warmup": warmup, "concurrency": concurrency, "attention": attention_used},
               "data": data, "calibration": calibration,
               "runs": {str(seed): results for seed, results in by_seed.items()},
               "summary": {str(seed): summary for seed, (summary, _) in per_seed.items()},
               "over_seeds": over_seeds,
               "plot": str(png) if plotted else None, "plot_seed": seeds[0],
               "seconds": round(time.time() - start, 1), "title": title, "table_md": md}
    C.write_json(opts.out, payload)
    return payload


if __name__ == "__main__":
    main()
