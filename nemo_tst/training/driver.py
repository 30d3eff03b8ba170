"""The two-phase run: plan, hand off, resume. `nemo-tst pretrain` calls `run`.

Checkpoint layout under Megatron's `--save DIR` (each a Megatron checkpoint directory):

    DIR/tst_run.json   the plan and model shape this directory belongs to
    DIR/phase1/        phase 1 saves here; it ends with the checkpoint of iteration n1
    DIR/phase2/        phase 2 loads DIR/phase1 the first time, then itself; saves here
    DIR/train.log      the trainer's full output, when no --log-file is given

So phase 2 never writes into phase 1's directory: the handoff checkpoint is never overwritten
or deleted. Megatron writes `latest_checkpointed_iteration.txt` only after a checkpoint is
complete, so an interrupted save is never taken as the latest one.

With s = 1 (`--tst-bag-size 1`, the baseline) there is no superposition phase: the run is one
launch of ordinary training, iterations 1..N, saved in and resumed from DIR/phase2 like a plain
Megatron run (`--tst-phase 2` or `both`; `--tst-phase 1` has nothing to do and says so). A
directory from the earlier two-launch layout (a phase-1 checkpoint, no phase 2 yet) resumes
from its phase-1 checkpoint in that one launch. The training is the same either way: at s = 1
both phases are ordinary next-token steps over the same samples.

The same command resumes anywhere: a phase whose directory already holds its final iteration
is skipped, an unfinished one continues from its latest checkpoint (Megatron restores weights,
optimizer, LR scheduler, RNG, iteration and consumed samples). Phase 2 from phase 1's
checkpoint is a resume, not a fine-tune: nothing is reset, and the one LR schedule continues.

Each launch is `python -m nemo_tst.training.pretrain` on every rank (what Slurm and NeMo-Run
run too): through torchrun for several processes, directly with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, ...) for one, which saves torchrun's own start-up.
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Optional

# torch warns, once megatron.core imports its extension loader, that no CUDA runtime exists: on
# a CPU machine that is the point, and on a GPU machine it is not said.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from nemo_tst.training.arguments import TSTPlan, add_tst_arguments, check_runtime, plan_from_args

__all__ = [
    "check_before_launch", "count_tokens", "latest_iteration", "parse_megatron_args", "phase_argv", "phase_commands",
    "resolve_phase_start", "run", "run_phases",
]

TRACKER = "latest_checkpointed_iteration.txt"

# Arguments that fix what a checkpoint directory holds: a rerun must agree on all of them.
RUN_IDENTITY = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "num_experts", "seq_length", "global_batch_size", "train_iters", "vocab_size",
    "position_embedding_type", "tst_bag_size", "tst_mode", "tst_weighting", "seed",
)


NO_PHASE1_AT_S1 = ("--tst-phase 1 with --tst-bag-size 1: there is no superposition phase, nothing "
                   "to do; the whole run is one launch (--tst-phase 2 or both)")
"""What the driver and each rank say when asked for phase 1 of a baseline (s = 1)."""

_ARGV_LOCK = threading.Lock()  # Megatron's parser reads sys.argv: one parse at a time


def parse_megatron_args(argv: list[str]) -> argparse.Namespace:
    """Megatron-LM's parser plus the TST group, without Megatron's validation side effects.
    Safe to call from several threads (the demo plans its runs side by side)."""
    from megatron.training.arguments import parse_args

    with _ARGV_LOCK:
        saved = sys.argv
        sys.argv = ["nemo-tst"] + [a for a in argv if a != "--tst-cpu"]
        try:
            return parse_args(extra_args_provider=add_tst_arguments)
        finally:
            sys.argv = saved


def run_phases(plan: TSTPlan) -> tuple[int, ...]:
    """The phases a run launches: (1, 2), or (2,) at s = 1, where there is no superposition
    phase and "phase 2" is the whole run, iterations 1..N, in one launch."""
    return (2,) if plan.superposition.bag_size == 1 else (1, 2)


def latest_iteration(checkpoint_dir: Path) -> Optional[int]:
    """The iteration of the last complete checkpoint in a Megatron save directory."""
    tracker = checkpoint_dir / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return 0 if text == "release" else int(text)


def _identity(args, plan: TSTPlan) -> dict:
    ident = {k: getattr(args, k, None) for k in RUN_IDENTITY}
    ident["phase1_iters"] = plan.phase1_iters
    return ident


def claim_run_directory(save: Path, args, plan: TSTPlan) -> None:
    """Record the run in DIR/tst_run.json, or refuse a directory that holds another run."""
    manifest = save / "tst_run.json"
    ident = _identity(args, plan)
    if manifest.is_file():
        previous = json.loads(manifest.read_text())["identity"]
        diff = {k: (previous.get(k), v) for k, v in ident.items() if previous.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"--save {save} holds a different TST run ({details}); choose a new --save "
                "directory, or rerun with the original settings to resume it"
            )
        return
    if save.exists() and any(save.iterdir()):
        raise ValueError(
            f"--save {save} is not empty and holds no tst_run.json: it is not a TST run "
            "directory; choose a new or empty --save directory"
        )
    save.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps({"identity": ident, "plan": asdict(plan) | {"superposition": asdict(plan.superposition)}},
                   indent=2, default=str)
    )


def _without(argv: list[str], *options: str) -> list[str]:
    """argv minus the given options and their single values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in options:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def phase_commands(argv: list[str], args, plan: TSTPlan) -> list[tuple[int, list[str]]]:
    """[(phase, extra Megatron argv)] still to run, judged from the checkpoints on disk.

    At s = 1 that is at most one launch, (2, ...), for all N iterations (`run_phases`)."""
    save = Path(args.save)
    p1_dir, p2_dir = save / "phase1", save / "phase2"
    N, n1 = plan.train_iters, plan.phase1_iters
    p1_done, p2_done = latest_iteration(p1_dir), latest_iteration(p2_dir)
    for where, it in ((p1_dir, p1_done), (p2_dir, p2_done)):
        if it is not None and it > N:
            raise ValueError(
                f"{where} holds a checkpoint of iteration {it}, past the plan's end "
                f"(--train-iters {N}); it belongs to another plan: choose a new --save"
            )
    if p1_done is not None and p1_done > n1:
        raise ValueError(
            f"{p1_dir} holds iteration {p1_done} but phase 1 ends at {n1}: the phase-1 "
            "length changed since this run started; rerun with the original "
            "--tst-phase1-fraction/--tst-phase1-iters"
        )
    wanted = {"both": (1, 2), "1": (1,), "2": (2,)}[args.tst_phase]
    wanted = tuple(p for p in wanted if p in run_phases(plan))
    commands = []
    if 1 in wanted and p2_done is None and (p1_done or 0) < n1:
        commands.append((1, phase_argv(argv, 1, save, n1)))
    if 2 in wanted and (p2_done or 0) < N:
        if 1 not in wanted and 1 in run_phases(plan) and p2_done is None and p1_done != n1:
            raise ValueError(
                f"phase 2 needs phase 1's checkpoint of iteration {n1} in {p1_dir}, found "
                f"{'none' if p1_done is None else f'iteration {p1_done}'}; run phase 1 first "
                "(--tst-phase 1) or both (--tst-phase both)"
            )
        commands.append((2, phase_argv(argv, 2, save, n1)))
    return commands


def phase_argv(argv: list[str], phase: int, save: Path, phase1_iters: int) -> list[str]:
    """The per-rank arguments of one phase (`python -m nemo_tst.training.pretrain ...`): the
    run's arguments with --save/--load/--tst-phase/--exit-interval set for the phase.

    Phase 1 saves to and resumes from SAVE/phase1 and exits at n1. Phase 2 saves to
    SAVE/phase2 and resumes from it; the first time (nothing there yet) each rank starts
    from SAVE/phase1 instead (`--tst-phase1-checkpoint`, see `resolve_phase_start`; at s = 1,
    from iteration 0 when SAVE/phase1 is empty). The arguments do not depend on what is on
    disk, so a scheduler can submit both phases at once.
    """
    p1_dir, p2_dir = save / "phase1", save / "phase2"
    base = _without(argv, "--save", "--load", "--tst-phase", "--exit-interval", "--tst-phase1-checkpoint")
    if phase == 1:
        return base + ["--tst-phase", "1", "--save", str(p1_dir), "--load", str(p1_dir),
                       "--exit-interval", str(phase1_iters)]
    return base + ["--tst-phase", "2", "--save", str(p2_dir), "--load", str(p2_dir),
                   "--tst-phase1-checkpoint", str(p1_dir)]


def resolve_phase_start(args, plan: TSTPlan) -> Optional[str]:
    """On each rank, before Megatron loads: where this phase starts, or why it has nothing to do.

    Sets `args.load` to SAVE/phase1 for phase 2's first start. Returns a message (and the rank
    should exit 0) when the phase is already complete, or is phase 1 of an s = 1 run (which
    has none); raises ValueError when phase 2 (s > 1) has neither its own checkpoint nor phase
    1's final one. At s = 1 phase 2 is the whole run: without a checkpoint of its own it starts
    from iteration 0, or from SAVE/phase1's latest checkpoint if an earlier two-launch run left
    one there."""
    n1, N = plan.phase1_iters, plan.train_iters
    single = 1 not in run_phases(plan)
    if args.tst_phase == "1":
        if single:
            return NO_PHASE1_AT_S1
        done = latest_iteration(Path(args.load)) if args.load else None
        if done is not None and done >= n1:
            return f"phase 1 is complete (iteration {done} in {args.load}); nothing to do"
        return None
    handoff = getattr(args, "tst_phase1_checkpoint", None)
    own = latest_iteration(Path(args.load)) if args.load else None
    if own is not None:
        return f"phase 2 is complete (iteration {own} in {args.load}); nothing to do" if own >= N else None
    if handoff is None:
        return None  # the caller passed --load itself (nemo-tst pretrain does this)
    got = latest_iteration(Path(handoff))
    if single:
        if got is not None:
            args.load = handoff  # the two-launch layout's phase 1: the same training, resumed
        return None
    if got != n1:
        raise ValueError(
            f"phase 2 starts from phase 1's checkpoint of iteration {n1} in {handoff}, found "
            f"{'none' if got is None else f'iteration {got}'}: run phase 1 to its end first"
        )
    args.load = handoff
    return None


def check_parallel_layout(args, nproc: int) -> None:
    """Parallel sizes that cannot tile `nproc` ranks, refused before torchrun starts."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    if nproc % (tp * pp * cp):
        raise ValueError(
            f"--nproc-per-node {nproc} is not a multiple of tp x pp x cp = {tp}x{pp}x{cp}; "
            "change the parallel sizes or the process count"
        )
    dp = nproc // (tp * pp * cp)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of "
            f"--micro-batch-size x data-parallel size = {args.micro_batch_size}x{dp}"
        )
    if args.num_experts:
        if args.num_experts % ep:
            raise ValueError(
                f"--num-experts {args.num_experts} must be divisible by "
                f"--expert-model-parallel-size {ep}"
            )
        if (nproc // pp) % (ep * etp):
            raise ValueError(
                f"expert parallel x expert tensor parallel = {ep}x{etp} must divide the "
                f"{nproc // pp} ranks of a pipeline stage; change --expert-model-parallel-size"
            )
    elif ep > 1:
        raise ValueError("--expert-model-parallel-size > 1 needs an MoE model (--num-experts)")


def check_data_and_tokenizer(args, plan: TSTPlan) -> None:
    """Inputs that would otherwise fail minutes later, inside every rank."""
    if args.tst_tokenizer is None:
        raise ValueError("--tst-tokenizer is required: the tokenizer.json the data was "
                         "preprocessed with (nemo-tst preprocess writes one)")
    if not Path(args.tst_tokenizer).is_file():
        raise ValueError(f"--tst-tokenizer {args.tst_tokenizer} does not exist")
    from nemo_tst.data.tokenizer import HFTokenizer

    vocab = HFTokenizer.from_file(args.tst_tokenizer).vocab_size
    model_vocab = args.padded_vocab_size or args.vocab_size
    if model_vocab is not None and vocab > model_vocab:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocabulary is {model_vocab}: "
            f"set --vocab-size {vocab} (or larger)"
        )
    train = [p for p in (args.train_data_path or args.data_path or []) if not _is_number(p)]
    others = [p for p in (args.valid_data_path or []) + (args.test_data_path or []) if not _is_number(p)]
    if not train:
        raise ValueError("no training data: give --train-data-path (or --data-path), the "
                         "prefixes written by nemo-tst preprocess")
    for prefix in train + others:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ValueError(f"data prefix {prefix}: {prefix + suffix} does not exist; "
                                 "run nemo-tst preprocess or fix the path")

    from nemo_tst.training.data import check_corpus_budget, item_sequence_length

    tokens = count_tokens(train)
    one_batch = plan.global_batch_size * (item_sequence_length(plan) + 1)
    if tokens < one_batch:
        raise ValueError(
            f"the training data holds {tokens:,} tokens, fewer than one global batch of the plan "
            f"({one_batch:,}: --global-batch-size x the phase-1 sample); add data or shrink "
            "--global-batch-size / --seq-length"
        )
    check_corpus_budget(plan, tokens, strict=args.tst_strict_data)


def count_tokens(prefixes: list[str]) -> int:
    """Tokens in Megatron indexed datasets (PREFIX.bin/.idx)."""
    import logging
    import warnings

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    reader_log = logging.getLogger("megatron.core.datasets.indexed_dataset")
    level = reader_log.level
    reader_log.setLevel(logging.WARNING)  # its INFO lines describe the index, not the run
    tokens = 0
    try:
        with warnings.catch_warnings():
            # megatron.core asks for a rank it cannot know before any process group exists
            warnings.filterwarnings("ignore", message="Could not determine rank")
            for prefix in prefixes:
                index = IndexedDataset(prefix)  # keep it alive: its arrays view a mapping it closes
                tokens += int(index.sequence_lengths.sum())
                del index
    finally:
        reader_log.setLevel(level)
    return tokens


def _run_and_tee(cmd: list[str], env: dict, sink, on_line=None) -> tuple[int, list[str]]:
    """Run the phase, copying its output to `sink` (and each line to `on_line`); returns the
    exit status and the lines that say why it stopped (Megatron's logged errors and raised
    exceptions).

    The copy runs in a thread and the exit status is what is waited for: a helper process the
    trainer left behind (a checkpoint writer orphaned by a crash) may hold the pipe open."""
    reasons = []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)

    def copy():
        for line in proc.stdout:
            sink.write(line)
            if on_line is not None:
                on_line(line)
            if line.startswith("ERROR:megatron") or (
                re.search(r"\b\w*(Error|Exception): ", line) and "ChildFailedError" not in line
            ):
                reasons.append(line.strip())

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C or an error in the caller: take the launch down with it
        proc.terminate()
        proc.wait()
        raise
    copier.join(timeout=10)
    sink.flush()
    return rc, reasons


def _why(reasons: list[str]) -> str:
    """': <why the trainer stopped>': Megatron's first logged error (e.g. the rerun state
    machine's non-finite loss report), else the last exception line."""
    logged = [r.split(":", 2)[-1].strip() for r in reasons if r.startswith("ERROR:megatron")]
    if logged:
        return f": {logged[0]}"
    return f": {reasons[-1].split('] ', 1)[-1]}" if reasons else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(nproc: int, megatron_argv: list[str]) -> tuple[list[str], dict]:
    """(command, environment additions) of one launch on this machine: torchrun, one process
    per device (or per CPU rank); for one process, the rank itself with the environment
    torchrun would give it (no torchrun process to start, import torch in, and wait for)."""
    port = str(_free_port())
    entry = ["-m", "nemo_tst.training.pretrain", *megatron_argv]
    if nproc == 1:
        env = {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        return [sys.executable, *entry], env
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={port}", *entry], {}


def check_before_launch(argv: list[str], args, plan: TSTPlan, nproc: int) -> list[tuple[int, list[str]]]:
    """Every check a run passes on the machine that launches it, before anything is written:
    nemo-tst's own arguments, the parallel layout, data and tokenizer, the checkpoints on disk,
    what this machine provides. Returns the phases still to run (`phase_commands`)."""
    if args.exit_interval:
        raise ValueError("--exit-interval is set by nemo-tst to end phase 1; remove it")
    if not args.save:
        raise ValueError("--save is required: TST keeps phase 1 and phase 2 checkpoints under it")
    if args.load and Path(args.load) != Path(args.save):
        raise ValueError(
            "--load is managed by nemo-tst (phase 2 loads phase 1's checkpoint): pass only "
            "--save, and rerun the same command to resume"
        )
    check_parallel_layout(args, nproc)
    check_data_and_tokenizer(args, plan)
    commands = phase_commands(argv, args, plan)  # validates the checkpoints on disk
    check_runtime(args)
    return commands


def run(argv: list[str], *, nproc: int = 1, log_file: Optional[Path] = None, on_line=None,
        say=None, env: Optional[dict] = None) -> TSTPlan:
    """Plan, validate, then run (or resume) the phases still to do, one launch each.

    The trainer's whole output (argument dump, warnings, every rank) is appended to `log_file`
    (default: SAVE/train.log); `on_line(line)`, if given, sees each line too (the CLI echoes
    the progress lines, the demo draws its progress line). `say(text)` prints nemo-tst's own
    lines (default: stdout). `env`: extra environment for the launched ranks."""
    say = say or (lambda text: print(text, flush=True))
    args = parse_megatron_args(argv)
    if args.tokenizer_type is None and args.tst_tokenizer and Path(args.tst_tokenizer).is_file():
        # The data's tokenizer sizes the model: Megatron only needs the vocabulary size.
        from nemo_tst.data.tokenizer import HFTokenizer

        vocab = HFTokenizer.from_file(args.tst_tokenizer).vocab_size
        argv = [*argv, "--tokenizer-type", "NullTokenizer"]
        if args.vocab_size is None:
            argv += ["--vocab-size", str(vocab)]
        args = parse_megatron_args(argv)
    plan = plan_from_args(args)
    commands = check_before_launch(argv, args, plan, nproc)
    save = Path(args.save)
    claim_run_directory(save, args, plan)  # the first write, after every check
    log_file = Path(log_file) if log_file else save / "train.log"
    if args.tst_phase == "1" and 1 not in run_phases(plan):
        say(f"[nemo-tst] {NO_PHASE1_AT_S1}")
    launch_env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1", **(env or {}))
    for phase, extra in commands:
        cmd, rank_env = launch_command(nproc, extra)
        last = plan.train_iters if phase == 2 else plan.phase1_iters
        done = latest_iteration(save / f"phase{phase}")
        if done is None and phase == 2 and 1 in run_phases(plan):
            done = plan.phase1_iters
        elif done is None and phase == 2:
            done = latest_iteration(save / "phase1") or 0  # s = 1: see resolve_phase_start
        what = "" if 1 in run_phases(plan) else "; s=1: no superposition phase, the whole run in one launch"
        say(f"[nemo-tst] phase {phase} (iterations {(done or 0) + 1}-{last}{what}) on {nproc} "
            f"process(es); trainer output: {log_file}")
        with open(log_file, "a") as log:
            log.write(f"[nemo-tst] {' '.join(cmd)}\n")
            log.flush()
            rc, reasons = _run_and_tee(cmd, dict(launch_env, **rank_env), log, on_line)
        if rc != 0:
            raise RuntimeError(
                f"phase {phase} exited with status {rc}{_why(reasons)}; see {log_file}. Rerun "
                "the same command to resume from the latest checkpoint"
            )
        # Megatron also exits 0 when asked to stop early (SIGTERM with --exit-signal-handler,
        # --exit-duration-in-mins): the next phase starts only from a finished one.
        reached = latest_iteration(save / f"phase{phase}")
        if reached != last:
            raise RuntimeError(
                f"phase {phase} stopped at iteration {reached} before its end ({last}); see "
                f"{log_file}; nothing was lost: rerun the same command to resume"
            )
    return plan
