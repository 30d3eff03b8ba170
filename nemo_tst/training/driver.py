"""The two-phase run on Megatron-LM's trainer: check, launch, hand off, resume.
`nemo-tst pretrain` calls `run`.

The run directory is Megatron's `--save DIR`, laid out as `nemo_tst.core.run_dir` says (a
manifest, one save directory per phase, the trainer's full output when no --log-file is
given). With s = 1 (the baseline) the run is one launch of ordinary training, iterations
1..N, saved in and resumed from phase 2's directory like a plain Megatron run.

The same command resumes anywhere: a phase whose directory already holds its final iteration
is skipped, an unfinished one continues from its latest checkpoint (Megatron restores weights,
optimizer, LR scheduler, RNG, iteration and consumed samples). Phase 2 from phase 1's
checkpoint is a resume, not a fine-tune: nothing is reset, and the one LR schedule continues.

Each launch is `python -m nemo_tst.training.pretrain` on every rank (what Slurm and NeMo-Run
run too): through torchrun for several processes, directly with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, ...) for one, which saves torchrun's own start-up.
"""

import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from nemo_tst.training.logs import is_training_start, quiet_cuda_runtime_notice

quiet_cuda_runtime_notice()  # before megatron.core is imported (see its docstring)

from nemo_tst.core.data import corpus_shortfall, item_sequence_length
from nemo_tst.core.plan import TSTPlan, run_phases
from nemo_tst.core.run_dir import (
    RunDirectory,
    fall_back,
    latest_iteration,
    phase_start,
    settings_identity,
    usable_checkpoint,
)
from nemo_tst.core.run_lock import LOCK_HELD_ENV, RunLock
from nemo_tst.errors import RunFailed
from nemo_tst.training.arguments import (
    MEGATRON_NAMES,
    check_runtime,
    check_with_megatron,
    parse_megatron_args,
    plan_from_args,
)
from nemo_tst.training.argv import phase_argv, with_data_tokenizer

__all__ = [
    "check_before_launch", "check_corpus_budget", "claim_run_directory", "count_tokens",
    "phase_commands", "resolve_phase_start", "run",
]

logger = logging.getLogger(__name__)

# Megatron arguments that fix what a checkpoint directory holds, besides the TST settings
# (`settings_identity`): a rerun must agree on all of them.
MODEL_IDENTITY = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "num_experts", "seq_length", "global_batch_size", "train_iters", "vocab_size",
    "position_embedding_type", "seed", "hybrid_layer_pattern",
)


NO_PHASE1_AT_S1 = ("--tst-phase 1 with --tst-bag-size 1: there is no superposition phase, nothing "
                   "to do; the whole run is one launch (--tst-phase 2 or both)")
"""What the driver and each rank say when asked for phase 1 of a baseline (s = 1)."""

def run_identity(args, plan: TSTPlan) -> dict:
    """What fixes the contents of a run directory: the model shape, batch, steps and seed, and
    every TST setting."""
    return {k: getattr(args, k, None) for k in MODEL_IDENTITY} | settings_identity(plan.settings, plan)


def claim_run_directory(save: Path, args, plan: TSTPlan) -> None:
    """Record the run in SAVE's manifest, or refuse a directory that holds another run."""
    RunDirectory(save).claim(run_identity(args, plan), plan, MEGATRON_NAMES)


def phase_commands(argv: list[str], args, plan: TSTPlan) -> list[tuple[int, list[str]]]:
    """[(phase, per-rank argv)] still to run, judged from the checkpoints on disk.

    At s = 1 that is at most one launch, (2, ...), for all N iterations (`run_phases`)."""
    save = Path(args.save)
    wanted = {"both": (1, 2), "1": (1,), "2": (2,)}[args.tst_phase]
    todo = RunDirectory(save).phases_to_run(plan, MEGATRON_NAMES, wanted)
    return [(phase, phase_argv(argv, phase, save, plan.phase1_iters)) for phase in todo]


def resolve_phase_start(args, plan: TSTPlan) -> Optional[str]:
    """On each rank, before Megatron loads: where this phase starts, or why it has nothing to do.

    Sets `args.load` for the phase (`phase_start`: its own directory, or phase 1's
    handoff for phase 2's first start). Returns a message (and the rank should exit 0) when
    the phase is already complete, or is phase 1 of an s = 1 run (which has none); raises
    ValueError when phase 2 (s > 1) has neither its own checkpoint nor phase 1's final one."""
    phase = int(args.tst_phase)
    if phase == 1 and 1 not in run_phases(plan):
        return NO_PHASE1_AT_S1
    own = Path(args.load) if args.load else None
    if own is None:
        return None  # nothing to resume from: Megatron starts at iteration 0
    handoff = getattr(args, "tst_phase1_checkpoint", None) if phase == 2 else None
    load, nothing_to_do = phase_start(plan, phase, own, Path(handoff) if handoff else None)
    if nothing_to_do:
        return nothing_to_do
    # Only global rank 0 reads the checkpoint's metadata (a shared file system serves one
    # reader, not every rank); a damaged checkpoint stops it, and the launcher (torchrun, srun)
    # then ends the others.
    damaged = usable_checkpoint(load)[1] if os.environ.get("RANK", "0") == "0" else []
    if damaged:  # ranks do not repair (they run at once): the driver does, before it launches
        raise ValueError(
            f"the latest checkpoint in {load} is damaged ({'; '.join(damaged)}): run `nemo-tst "
            "pretrain` once with this run's arguments (it falls back to the newest complete "
            "checkpoint, keeping the damaged files), then resubmit"
        )
    args.load = str(load)
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
    from nemo_tst.data.provenance import SIDECAR, index_problem, read_provenance
    from nemo_tst.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.from_file(args.tst_tokenizer)
    vocab = tokenizer.vocab_size
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
        problem = index_problem(prefix)
        if problem:
            raise ValueError(f"data prefix {prefix}: {problem}; rerun nemo-tst preprocess for it")
        made_by = read_provenance(prefix)
        if made_by is None:
            continue  # not written by nemo-tst preprocess: nothing recorded to check against
        if made_by.get("tokenizer_sha256") != tokenizer.fingerprint():
            raise ValueError(
                f"the data {prefix} was preprocessed with another tokenizer "
                f"({made_by.get('tokenizer') or 'recorded in ' + prefix + SIDECAR}, vocabulary "
                f"{made_by.get('vocab_size')}) than --tst-tokenizer {args.tst_tokenizer} "
                f"(vocabulary {vocab}): give the tokenizer the data was made with, or preprocess "
                "the data again with this one"
            )
        if model_vocab is not None and made_by.get("max_token_id", -1) >= model_vocab:
            raise ValueError(
                f"--vocab-size {model_vocab} is below the largest token id of {prefix} "
                f"({made_by['max_token_id']}): set --vocab-size {vocab}"
            )

    tokens = count_tokens(train)
    one_batch = plan.global_batch_size * (item_sequence_length(plan) + 1)
    if tokens < one_batch:
        raise ValueError(
            f"the training data holds {tokens:,} tokens, fewer than one global batch of the plan "
            f"({one_batch:,}: --global-batch-size x the phase-1 sample); add data or shrink "
            "--global-batch-size / --seq-length"
        )
    check_corpus_budget(plan, tokens, strict=args.tst_strict_data)


def check_corpus_budget(plan: TSTPlan, corpus_tokens: int, *, strict: bool) -> Optional[str]:
    """Warn (or refuse, under --tst-strict-data) when the plan reads more text than one epoch
    of the corpus holds (`corpus_shortfall`); returns the warning."""
    message = corpus_shortfall(plan, corpus_tokens)
    if message and strict:
        raise ValueError(f"{message} (or drop --tst-strict-data to proceed)")
    if message:
        logger.warning(message)
    return message


_QUIET_INDEX_READ = threading.Lock()
"""Held while `count_tokens` quiets the index reader's logger and warnings, which are
process-wide: two runs checked at once (the demo's threads) would otherwise restore each
other's setting mid-read and let the reader's INFO lines through to the terminal."""


def count_tokens(prefixes: list[str]) -> int:
    """Tokens in Megatron indexed datasets (PREFIX.bin/.idx)."""
    import logging
    import warnings

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    reader_log = logging.getLogger("megatron.core.datasets.indexed_dataset")
    tokens = 0
    with _QUIET_INDEX_READ:
        level = reader_log.level
        reader_log.setLevel(logging.WARNING)  # its INFO lines describe the index, not the run
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


def _run_and_tee(cmd: list[str], env: dict, sink, on_line=None) -> tuple[int, list[str], bool]:
    """Run the phase, copying its output to `sink` (and each line to `on_line`); returns the
    exit status, the lines that say why it stopped (Megatron's logged errors and raised
    exceptions), and whether the trainer reached its training loop (Megatron's
    "training ..." line): a launch that fails before it failed on its inputs or machine,
    and a rerun cannot resume anything it did.

    The copy runs in a thread and the exit status is what is waited for: a helper process the
    trainer left behind (a checkpoint writer orphaned by a crash) may hold the pipe open."""
    reasons, trained = [], []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)

    def copy():
        for line in proc.stdout:
            sink.write(line)
            if on_line is not None:
                on_line(line)
            if not trained and is_training_start(line):
                trained.append(True)
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
    return rc, reasons, bool(trained)


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


def check_before_launch(argv: list[str], args, plan: TSTPlan, nproc: int) -> list:
    """Every check a run passes on the machine that launches it, before anything is written:
    nemo-tst's own arguments, the parallel layout, data and tokenizer, the run directory and
    its checkpoints, what this machine provides, and Megatron-LM's own validation. Returns the
    damaged-checkpoint fallbacks the run will make (`RunDirectory.damaged_fallbacks`)."""
    if args.exit_interval:
        raise ValueError("--exit-interval is set by nemo-tst to end phase 1; remove it")
    if not args.save:
        raise ValueError("--save is required: TST keeps phase 1 and phase 2 checkpoints under it")
    if args.load and Path(args.load) != Path(args.save):
        raise ValueError(
            "--load is managed by nemo-tst (phase 2 loads phase 1's checkpoint): pass only "
            "--save, and rerun the same command to resume"
        )
    run_directory = RunDirectory(args.save)
    run_directory.check(run_identity(args, plan), MEGATRON_NAMES)
    check_parallel_layout(args, nproc)
    check_data_and_tokenizer(args, plan)
    run_directory.progress(plan, MEGATRON_NAMES)  # the checkpoints belong to this plan
    fallbacks = run_directory.damaged_fallbacks(plan, MEGATRON_NAMES)
    if not fallbacks:
        phase_commands(argv, args, plan)  # what is asked for can run from what is on disk
    check_runtime(args)
    check_with_megatron(args, nproc)
    return fallbacks


FP8_DELAYED_NOTE = (
    "FP8 delayed scaling (--fp8-recipe delayed) scales each GEMM from the amax history of up to "
    "--fp8-amax-history-len earlier steps, and phase 2 inherits phase 1's history although its "
    "activations and gradients differ; per-tensor current scaling (--fp8-recipe tensorwise; "
    "recipes: precision=fp8_current) keeps no history and is the recommended FP8 recipe for TST"
)


def run(argv: list[str], *, nproc: int = 1, log_file: Optional[Path] = None, on_line=None,
        say=None, env: Optional[dict] = None) -> TSTPlan:
    """Plan, validate, then run (or resume) the phases still to do, one launch each.

    The trainer's whole output (argument dump, warnings, every rank) is appended to `log_file`
    (default: `RunDirectory.log`); `on_line(line)`, if given, sees each line too (the CLI echoes
    the progress lines, the demo draws its progress line). `say(text)` prints nemo-tst's own
    lines (default: stdout). `env`: extra environment for the launched ranks."""
    say = say or (lambda text: print(text, flush=True))
    args = parse_megatron_args(argv)
    if args.tokenizer_type is None and args.tst_tokenizer and Path(args.tst_tokenizer).is_file():
        # The data's tokenizer sizes the model: Megatron only needs the vocabulary size.
        from nemo_tst.data.tokenizer import HFTokenizer

        vocab = HFTokenizer.from_file(args.tst_tokenizer).vocab_size
        argv = with_data_tokenizer(argv, vocab, has_vocab_size=args.vocab_size is not None)
        args = parse_megatron_args(argv)
    plan = plan_from_args(args)
    fallbacks = check_before_launch(argv, args, plan, nproc)
    if args.fp8 and getattr(args, "fp8_recipe", None) == "delayed" and 1 in run_phases(plan):
        say(f"[nemo-tst] note: {FP8_DELAYED_NOTE}")
    save = Path(args.save)
    # The first writes, after every check: the lock (held over all launches), then the claim.
    with RunLock(save, say=say).acquire(MEGATRON_NAMES):
        claim_run_directory(save, args, plan)
        for directory, iteration, problems in fallbacks:
            say(f"[nemo-tst] WARNING: the latest checkpoint in {directory} is damaged "
                f"({'; '.join(problems)}); falling back")
            fall_back(directory, iteration, lambda text: say(f"[nemo-tst] {text}"))
        commands = phase_commands(argv, args, plan)
        _launch_phases(commands, plan, save, nproc, log_file, on_line, say, env, args)
    return plan


def _launch_phases(commands, plan: TSTPlan, save: Path, nproc: int, log_file, on_line, say, env, args) -> None:
    """Each phase still to run, one launch each; a phase that stops short ends the run."""
    run_directory = RunDirectory(save)
    log_file = Path(log_file) if log_file else run_directory.log
    if args.tst_phase == "1" and 1 not in run_phases(plan):
        say(f"[nemo-tst] {NO_PHASE1_AT_S1}")
    launch_env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1",
                      **{LOCK_HELD_ENV: str(save)}, **(env or {}))
    if args.tst_cpu:  # a CPU run on a machine with GPUs: its ranks see none
        launch_env["CUDA_VISIBLE_DEVICES"] = ""
    for phase, extra in commands:
        cmd, rank_env = launch_command(nproc, extra)
        last = plan.train_iters if phase == 2 else plan.phase1_iters
        load, _ = phase_start(plan, phase, run_directory.phase_dir(phase), run_directory.phase_dir(1))
        done = latest_iteration(load) if load is not None else None
        what = "" if 1 in run_phases(plan) else "; s=1: no superposition phase, the whole run in one launch"
        say(f"[nemo-tst] phase {phase} (iterations {(done or 0) + 1}-{last}{what}) on {nproc} "
            f"process(es); trainer output: {log_file}")
        with open(log_file, "a") as log:
            log.write(f"[nemo-tst] {' '.join(cmd)}\n")
            log.flush()
            rc, reasons, trained = _run_and_tee(cmd, dict(launch_env, **rank_env), log, on_line)
        if rc != 0:
            reached = run_directory.latest(phase)
            if not trained:
                raise RunFailed(
                    f"phase {phase} failed before training started (status {rc}){_why(reasons)}; "
                    f"see {log_file}. Fix the cause it names, then rerun"
                )
            raise RunFailed(
                f"phase {phase} crashed during training (status {rc}){_why(reasons)}; see "
                f"{log_file}. Rerun the same command to resume from the latest checkpoint "
                f"({'none yet' if reached is None else f'iteration {reached}'})"
            )
        # Megatron also exits 0 when asked to stop early (SIGTERM with --exit-signal-handler,
        # --exit-duration-in-mins): the next phase starts only from a finished one.
        reached = run_directory.latest(phase)
        if reached != last:
            raise RunFailed(
                f"phase {phase} stopped at iteration {reached} before its end ({last}); see "
                f"{log_file}; nothing was lost: rerun the same command to resume"
            )
