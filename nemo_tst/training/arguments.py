"""`--tst-*` arguments for Megatron-LM's parser, and the two-phase plan they describe.

A Megatron GPT job becomes a TST job by switching its entry point to `nemo-tst pretrain` and
adding, at least, `--tst-bag-size`. Every other argument keeps its Megatron meaning; in
particular `--seq-length` is L, the number of latent positions the transformer runs on in both
phases (phase-1 samples hold s*L text tokens), and `--train-iters` counts both phases.

One WSD (or any) LR schedule spans the run: both phases carry the same `--train-iters N` and
schedule arguments (phase 1 stops at n1 through `--exit-interval`), so Megatron's resume check
passes without `--override-opt-param-scheduler`.

`check_plan` holds the checks of a run's numbers that every integration needs (the Megatron-LM
arguments here, the Megatron-Bridge adapter in `nemo_tst.bridge`); each passes `SettingNames`,
how it spells the settings, so that an error names the setting the user wrote.
"""

import argparse
import math
from dataclasses import dataclass

from nemo_tst.superposition.config import MODES, WEIGHTINGS, SuperpositionConfig

__all__ = [
    "MEGATRON_NAMES", "PHASES", "SettingNames", "TSTPlan", "add_tst_arguments", "check_plan",
    "check_runtime", "phase1_iterations", "plan_from_args",
]

PHASES = ("both", "1", "2")


def add_tst_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: adds the TST group to Megatron-LM's parser."""
    group = parser.add_argument_group("token-superposition training")
    group.add_argument("--tst-bag-size", type=int, default=None,
                       help="s: tokens averaged into one latent position in phase 1 "
                            "(paper: 6 dense, 16 MoE). Required.")
    group.add_argument("--tst-phase1-fraction", type=float, default=0.3,
                       help="r: fraction of --train-iters spent in phase 1 (paper: 0.2-0.4).")
    group.add_argument("--tst-phase1-iters", type=int, default=None,
                       help="Phase-1 iterations, instead of --tst-phase1-fraction.")
    group.add_argument("--tst-mode", choices=MODES, default="full",
                       help="full TST, or the paper's input-only / output-only ablations.")
    group.add_argument("--tst-weighting", choices=WEIGHTINGS, default="uniform",
                       help="How the s targets of a latent position share its loss.")
    group.add_argument("--tst-target-weights", type=float, nargs="+", default=None,
                       help="Explicit per-target weights (normalised to sum 1).")
    group.add_argument("--tst-mask-cross-document-targets", action="store_true",
                       help="Mask targets in a later document than the bag's last token.")
    group.add_argument("--tst-phase", choices=PHASES, default="both",
                       help="Run both phases, or only phase 1 / phase 2 (chained jobs).")
    group.add_argument("--tst-phase1-checkpoint", type=str, default=None,
                       help="Phase 2 only: phase 1's checkpoint directory, loaded when --load "
                            "holds no checkpoint yet (set by nemo-tst; lets a scheduler submit "
                            "both phases up front).")
    group.add_argument("--tst-attention", choices=("sdpa", "unfused"), default="sdpa",
                       help="Core attention without Transformer Engine (--transformer-impl "
                            "local): PyTorch scaled_dot_product_attention, or Megatron's "
                            "unfused softmax path.")
    group.add_argument("--tst-strict-data", action="store_true",
                       help="Fail instead of warning when the corpus is smaller than the plan.")
    group.add_argument("--tst-tokenizer", type=str, default=None,
                       help="Path of the tokenizer.json the data was preprocessed with "
                            "(gives the end-of-document id and the vocabulary size).")
    return parser


@dataclass(frozen=True, kw_only=True)
class TSTPlan:
    """Where phase 1 ends and how a sample maps to text, for one run."""

    superposition: SuperpositionConfig
    seq_length: int
    """L: latent positions in phase 1, tokens in phase 2."""
    global_batch_size: int
    train_iters: int
    """N: iterations of both phases together."""
    phase1_iters: int
    """n1: the first n1 iterations are phase 1."""

    @property
    def phase1_samples(self) -> int:
        return self.phase1_iters * self.global_batch_size

    @property
    def phase2_iters(self) -> int:
        return self.train_iters - self.phase1_iters

    def phase_of_iteration(self, iteration: int) -> int:
        """1 or 2 for the iteration about to run (0-based count of finished iterations)."""
        return 1 if iteration < self.phase1_iters else 2

    def text_tokens_after(self, iterations: int) -> int:
        """Text tokens the first `iterations` iterations trained on (inputs, not targets)."""
        L, B = self.seq_length, self.global_batch_size
        per_phase1_step = B * self.superposition.text_tokens_per_sample(L)
        phase1 = min(iterations, self.phase1_iters)
        return phase1 * per_phase1_step + max(iterations - self.phase1_iters, 0) * B * L

    def baseline_text_tokens(self) -> int:
        """Text an ordinary run of the same N, L and batch trains on (equal FLOPs)."""
        return self.train_iters * self.global_batch_size * self.seq_length


def phase1_iterations(train_iters: int, *, fraction: float, iters: int | None = None) -> int:
    """n1: `iters` when given, else r·N rounded to the nearest iteration (every integration
    uses this, so a recipe gives the same phase boundary through each)."""
    return iters if iters is not None else int(round(fraction * train_iters))


@dataclass(frozen=True, kw_only=True)
class SettingNames:
    """How an integration spells the settings `check_plan` names in its errors."""

    train_iters: str
    phase1_iters: str
    phase1_fraction: str
    bag_size: str
    seq_length: str
    tensor_parallel: str
    sequence_parallel: str
    context_parallel: str
    decay_iters: str
    wsd_decay_iters: str
    mtp_num_layers: str


MEGATRON_NAMES = SettingNames(
    train_iters="--train-iters",
    phase1_iters="--tst-phase1-iters",
    phase1_fraction="--tst-phase1-fraction",
    bag_size="--tst-bag-size",
    seq_length="--seq-length",
    tensor_parallel="--tensor-model-parallel-size",
    sequence_parallel="--sequence-parallel",
    context_parallel="--context-parallel-size",
    decay_iters="--lr-decay-iters",
    wsd_decay_iters="--lr-wsd-decay-iters",
    mtp_num_layers="--mtp-num-layers",
)


def check_plan(
    names: SettingNames,
    *,
    train_iters: int,
    phase1_iters: int,
    phase1_fraction: float | None,
    bag_size: int,
    seq_length: int,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    context_parallel: int = 1,
    mtp_num_layers: int | None = None,
    wsd_anneal: tuple[int, int] | None = None,
    wsd_note: str = "",
) -> None:
    """The checks of a run's numbers that do not depend on the trainer. Raises ValueError
    naming the setting (as `names` spells it) and the fix.

    phase1_fraction: None when n1 was given explicitly. wsd_anneal: (decay length, annealing
    length) in iterations for a WSD schedule, else None; the annealing starts at their
    difference and must not start inside phase 1 (the paper anneals over the last 10%).
    """
    N, n1, L = train_iters, phase1_iters, seq_length
    if not 1 <= n1 <= N - 1:
        if phase1_fraction is None:
            raise ValueError(
                f"{names.phase1_iters}={n1} must be between 1 and {names.train_iters} - 1 = "
                f"{N - 1}; phase 1 of 0 or all steps leaves no superposition or no recovery"
            )
        raise ValueError(
            f"{names.phase1_fraction}={phase1_fraction} of {names.train_iters}={N} gives {n1} "
            f"phase-1 iterations; it must give between 1 and {N - 1}: raise "
            f"{names.train_iters}, change {names.phase1_fraction}, or give {names.phase1_iters}"
        )
    if mtp_num_layers and bag_size > 1:
        raise ValueError(
            f"{names.mtp_num_layers}={mtp_num_layers}: multi-token prediction re-embeds shifted "
            f"token ids and cannot run in the superposition phase; unset {names.mtp_num_layers} "
            f"for the TST run, or use {names.bag_size}=1"
        )
    tp, cp = tensor_parallel or 1, context_parallel or 1
    if sequence_parallel and tp > 1 and L % tp:
        raise ValueError(
            f"{names.seq_length}={L} (latent positions) must be divisible by "
            f"{names.tensor_parallel}={tp} under {names.sequence_parallel}: sequence parallel "
            f"splits the L latent positions over the tensor-parallel ranks; pick "
            f"{names.seq_length} a multiple of {tp} or turn sequence parallel off"
        )
    if cp > 1 and L % (2 * cp):
        raise ValueError(
            f"{names.seq_length}={L} must be divisible by 2 x {names.context_parallel} = "
            f"{2 * cp}: context parallel splits the latent positions into 2*cp chunks so that "
            f"no bag is cut; pick {names.seq_length} a multiple of {2 * cp}"
        )
    if wsd_anneal is not None:
        decay, anneal = wsd_anneal
        if decay <= n1:
            raise ValueError(
                f"{names.decay_iters}={decay} ends the LR decay inside phase 1 (iterations "
                f"0..{n1}): one WSD schedule spans both phases; set {names.decay_iters} to "
                f"{names.train_iters} ({N}) or leave it unset"
            )
        if decay - anneal < n1:
            raise ValueError(
                f"{names.wsd_decay_iters}={anneal}{wsd_note} starts the WSD annealing at "
                f"iteration {decay - anneal} of a {decay}-iteration decay, inside phase 1 "
                f"(iterations 0..{n1}); set {names.wsd_decay_iters} to at most {decay - n1} "
                f"(the paper anneals over the last 10% of all steps, e.g. {max(1, N // 10)})"
            )


def plan_from_args(args: argparse.Namespace) -> TSTPlan:
    """Validate the TST arguments against Megatron's and return the plan.

    Raises ValueError naming the setting and the fix, before any model or data is built.
    """
    if args.tst_bag_size is None:
        raise ValueError("--tst-bag-size is required (s, e.g. 4; s=1 is ordinary training)")
    try:
        superposition = SuperpositionConfig(
            bag_size=args.tst_bag_size,
            mode=args.tst_mode,
            weighting=args.tst_weighting,
            target_weights=args.tst_target_weights,
            mask_cross_document_targets=args.tst_mask_cross_document_targets,
        )
    except ValueError as err:
        raise ValueError(f"--tst-bag-size / --tst-target-weights: {err}") from None
    if not args.train_iters:
        raise ValueError(
            "TST plans in iterations: set --train-iters (sample-based --train-samples is not "
            "supported)"
        )
    if getattr(args, "rampup_batch_size", None):
        raise ValueError(
            "--rampup-batch-size is not supported with TST: phase boundaries are counted in "
            "samples of a fixed global batch; remove it"
        )
    N = args.train_iters
    if args.tst_phase1_iters is not None:
        n1, r = args.tst_phase1_iters, None
    else:
        r = args.tst_phase1_fraction
        if not (isinstance(r, float) and math.isfinite(r) and 0.0 < r < 1.0):
            raise ValueError(
                f"--tst-phase1-fraction={r} must lie strictly between 0 and 1 (paper: 0.2-0.4)"
            )
        n1 = phase1_iterations(N, fraction=r)

    decay = args.lr_decay_iters or N  # Megatron's default decay length
    if args.lr_warmup_iters and args.lr_warmup_iters >= decay:
        raise ValueError(
            f"--lr-warmup-iters={args.lr_warmup_iters} must be smaller than the decay length "
            f"({decay} iterations): the one LR schedule spans both phases"
        )
    wsd_anneal = None
    if args.lr_decay_style == "WSD":
        anneal = getattr(args, "lr_wsd_decay_iters", None)
        if anneal is None:
            # Megatron's scheduler asserts on it, but only after the model is built.
            raise ValueError(
                "--lr-decay-style WSD needs --lr-wsd-decay-iters (the annealing length); the "
                f"paper anneals over the last 10% of all steps: --lr-wsd-decay-iters {max(1, N // 10)}"
            )
        wsd_anneal = (decay, anneal)
    L = args.seq_length
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    check_plan(
        MEGATRON_NAMES,
        train_iters=N,
        phase1_iters=n1,
        phase1_fraction=r,
        bag_size=superposition.bag_size,
        seq_length=L,
        tensor_parallel=tp,
        sequence_parallel=args.sequence_parallel,
        context_parallel=cp,
        mtp_num_layers=getattr(args, "mtp_num_layers", None),
        wsd_anneal=wsd_anneal,
    )
    if getattr(args, "fp8", None):
        # Transformer Engine's FP8 GEMMs need the tokens of a micro-batch on a rank to be a
        # multiple of 16 (32 for MXFP8); in phase 1 those are latent positions, as in phase 2.
        multiple = 32 if getattr(args, "fp8_recipe", None) == "mxfp8" else 16
        split = cp * (tp if args.sequence_parallel else 1)
        tokens = L // split * args.micro_batch_size
        if L % split or tokens % multiple:
            raise ValueError(
                f"FP8 ({args.fp8}, recipe {getattr(args, 'fp8_recipe', None)}) needs the "
                f"{tokens} tokens of a micro-batch per rank (--seq-length {L} / {split} x "
                f"--micro-batch-size {args.micro_batch_size}) to be a multiple of {multiple}: "
                "pick --seq-length or --micro-batch-size accordingly"
            )
    return TSTPlan(
        superposition=superposition,
        seq_length=L,
        global_batch_size=args.global_batch_size,
        train_iters=N,
        phase1_iters=n1,
    )


def check_runtime(args: argparse.Namespace) -> None:
    """What this machine must provide for the arguments: Transformer Engine for FP8 and the TE
    layer implementation, a Blackwell GPU for MXFP8. Run where the job runs, before launch."""
    import importlib.util

    import torch

    if args.fp8 and getattr(args, "fp8_recipe", None) == "mxfp8":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if capability is None or capability[0] < 10:
            found = f"compute capability {capability[0]}.{capability[1]}" if capability else "no GPU"
            raise ValueError(
                f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200), "
                f"found {found}: use --fp8-recipe delayed or tensorwise on Hopper "
                "(recipes: precision=fp8_delayed or fp8_current)"
            )
    wants_te = args.transformer_impl == "transformer_engine"
    if (args.fp8 or wants_te) and importlib.util.find_spec("transformer_engine") is None:
        asked = (f"--fp8-format {args.fp8}" if args.fp8 else "--transformer-impl transformer_engine")
        raise ValueError(
            f"{asked} needs Transformer Engine, which is not installed here: run in NVIDIA's "
            "NeMo or PyTorch container (docker/), install nemo-tst[te], or use bf16 with "
            "--transformer-impl local (recipes: precision=bf16 transformer_impl=local)"
        )
