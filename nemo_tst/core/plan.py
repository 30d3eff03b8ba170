"""The plan of one TST run: where phase 1 ends, what a step reads, and the checks of its
numbers that hold whatever trainer runs it.

    N   iterations of both phases (the trainer's train_iters)
    n1  the first n1 iterations are phase 1 (`TSTSettings.phase1_iterations(N)`)
    L   the sequence length: latent positions in phase 1, tokens in phase 2
    B   the global batch, in samples of either phase

With s = 1 there is no superposition phase: the run is N iterations of ordinary training,
one launch (`run_phases`).
"""

from dataclasses import dataclass
from typing import Optional

from nemo_tst.core.settings import SettingNames, TSTSettings
from nemo_tst.superposition.config import SuperpositionConfig

__all__ = ["TSTPlan", "check_plan", "run_phases"]


@dataclass(frozen=True, kw_only=True)
class TSTPlan:
    """Where phase 1 ends and how much text a step reads, for one run."""

    settings: TSTSettings
    seq_length: int
    """L: latent positions in phase 1, tokens in phase 2."""
    global_batch_size: int
    train_iters: int
    """N: iterations of both phases together."""
    phase1_iters: int
    """n1: the first n1 iterations are phase 1."""

    @property
    def superposition(self) -> SuperpositionConfig:
        return self.settings.superposition

    @property
    def phase1_samples(self) -> int:
        """Samples of phase 1 (n1 x B); phase 2 starts at this sample of the data stream."""
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


def run_phases(plan: TSTPlan) -> tuple[int, ...]:
    """The phases a run launches: (1, 2), or (2,) at s = 1, where there is no superposition
    phase and "phase 2" is the whole run, iterations 1..N, in one launch."""
    return (2,) if plan.superposition.bag_size == 1 else (1, 2)


def check_plan(
    names: SettingNames,
    settings: TSTSettings,
    *,
    train_iters: int,
    seq_length: int,
    global_batch_size: int,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    context_parallel: int = 1,
    mtp_num_layers: Optional[int] = None,
    wsd_anneal: Optional[tuple[int, int]] = None,
    wsd_note: str = "",
) -> TSTPlan:
    """The plan of a run, after the checks of its numbers that do not depend on the trainer.
    Raises ValueError naming the setting (as `names` spells it) and the fix.

    wsd_anneal: (decay length, annealing length) in iterations for a WSD schedule, else None;
    the annealing starts at their difference and must not start inside phase 1 (the paper
    anneals over the last 10%)."""
    N, L = train_iters, seq_length
    n1 = settings.phase1_iterations(N)
    if not 1 <= n1 <= N - 1:
        if settings.phase1_iters is not None:
            raise ValueError(
                f"{names.phase1_iters}={n1} must be between 1 and {names.train_iters} - 1 = "
                f"{N - 1}; phase 1 of 0 or all steps leaves no superposition or no recovery"
            )
        raise ValueError(
            f"{names.phase1_fraction}={settings.phase1_fraction} of {names.train_iters}={N} gives "
            f"{n1} phase-1 iterations; it must give between 1 and {N - 1}: raise "
            f"{names.train_iters}, change {names.phase1_fraction}, or give {names.phase1_iters}"
        )
    if mtp_num_layers and settings.bag_size > 1:
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
    return TSTPlan(settings=settings, seq_length=L, global_batch_size=int(global_batch_size),
                   train_iters=N, phase1_iters=n1)
