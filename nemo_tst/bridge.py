"""Optional Megatron-Bridge adapter: run TST from a Bridge `ConfigContainer` (a NeMo recipe).

Targets Megatron-Bridge 0.6.x (PyPI `megatron-bridge>=0.6,<0.7`). Written against the source
of tag v0.6.0, commit 51885cf132b2814188b6855c25a8588254274c2a, whose pinned megatron-core is
0.19.0 (Megatron-LM cd4afffa648426a959dc7cb1e24b5ce7d0c3ff54), the megatron-core line nemo_tst
uses; the parts used here are the same in the 0.6.2 wheel on PyPI. Bridge itself cannot be
imported without NVIDIA Transformer Engine, so every `megatron.bridge` import below is inside a
function: `import nemo_tst.bridge` works anywhere, and the Bridge-facing calls raise an
ImportError that says what to install. See docs/bridge.md.

What the adapter maps, and onto which Bridge piece:

    tst_phase_configs(cfg, tst)   recipe ConfigContainer -> (phase-1, phase-2) deep copies
        phase 1   train.train_iters = N (one LR/WD schedule, scheduler untouched),
                  train.exit_interval = n1 (Bridge saves and exits at n1),
                  checkpoint.save = checkpoint.load = DIR/phase1,
                  model: pre-wrap hook `tst_model_hook` (GPTModel -> TSTGPTModel in place)
        phase 2   checkpoint.load = DIR/phase2 if it holds a checkpoint, else DIR/phase1 -- a
                  resume (weights, optimizer, scheduler, RNG, iteration, consumed samples; no
                  finetune, no pretrained_checkpoint), checkpoint.save = DIR/phase2, plain model
        both      dataset = TSTDatasetProvider over the recipe's GPTDatasetConfig: one token
                  stream whose first n1 x global-batch samples hold s*L + k tokens (L bags of
                  s tokens + the k targets of the last position), then ordinary L+1-token
                  samples; validation/test are ordinary next-token data at L. model.seq_length
                  stays L in both phases.
    tst_forward_step              Bridge forward step for both phases: phase-1 batches go
                  through make_superposition_batch, the model's multi-hot loss and
                  reduce_multi_hot_loss, returned as Bridge's (sum, count, report) contract;
                  every other batch goes to Bridge's own gpt_step.forward_step.
    tst_pretrain(cfg, tst)        runs the next unfinished phase with Bridge's `pretrain`.

`DIR` is the recipe's `checkpoint.save` (or `run_dir=`). Phase 1 ends with Bridge's exit at
`exit_interval` (sys.exit after the checkpoint), so each phase is its own launch: run the same
script twice, or `tst_pretrain(..., phase=1)` then `phase=2` as two cluster jobs.

The pure parts (the plan and its checks, checkpoint-directory logic, the context-parallel
split, the phase-1 loss, the model hook) need no Bridge and are tested without it.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

__all__ = [
    "BRIDGE_COMMIT",
    "BRIDGE_REQUIREMENT",
    "BRIDGE_VERSION",
    "TSTBridgeConfig",
    "TSTDatasetProvider",
    "TSTRunPlan",
    "check_phase_iteration",
    "cp_zigzag_slice",
    "latest_checkpoint_iteration",
    "next_tst_phase",
    "phase2_load_dir",
    "plan_tst_run",
    "require_bridge",
    "tst_forward_step",
    "tst_model_hook",
    "tst_phase1_loss",
    "tst_phase_configs",
    "tst_pretrain",
]

BRIDGE_VERSION = "0.6.0"
"""The Megatron-Bridge release whose source this adapter was written against."""
BRIDGE_COMMIT = "51885cf132b2814188b6855c25a8588254274c2a"
"""Tag v0.6.0 of github.com/NVIDIA-NeMo/Megatron-Bridge."""
BRIDGE_REQUIREMENT = "megatron-bridge>=0.6,<0.7"

PHASE1_SUBDIR = "phase1"
PHASE2_SUBDIR = "phase2"

_MISSING_BRIDGE = (
    "nemo_tst.bridge needs NVIDIA Megatron-Bridge (the `megatron.bridge` package), which could "
    "not be imported here ({error}). Install it with `pip install \"{requirement}\"`: this "
    "adapter targets Megatron-Bridge 0.6.x (written against tag v{version}, commit "
    "{commit_short}, on megatron-core 0.19). Megatron-Bridge cannot be imported without NVIDIA Transformer Engine "
    "(`pip install --no-build-isolation \"transformer-engine[pytorch]\"`, which needs CUDA), so "
    "it is normally used inside an NVIDIA NeMo container. Without Bridge, run TST through "
    "Megatron-LM's trainer: `nemo-tst pretrain`."
)


# --------------------------------------------------------------------------------------------
# Bridge import (lazy)
# --------------------------------------------------------------------------------------------

_version_warned = False


def require_bridge() -> str:
    """Import Megatron-Bridge or raise a clear ImportError; returns Bridge's version string."""
    global _version_warned
    try:
        import megatron.bridge as bridge
        from megatron.bridge.training.config import ConfigContainer  # noqa: F401
    except Exception as err:  # ImportError, or Transformer Engine failing to load CUDA libraries
        raise ImportError(
            _MISSING_BRIDGE.format(
                error=f"{type(err).__name__}: {err}",
                requirement=BRIDGE_REQUIREMENT,
                version=BRIDGE_VERSION,
                commit_short=BRIDGE_COMMIT[:7],
            )
        ) from err
    version = str(getattr(bridge, "__version__", "unknown"))
    if not version.startswith("0.6.") and not _version_warned:
        _version_warned = True
        warnings.warn(
            f"nemo_tst.bridge targets Megatron-Bridge 0.6.x ({BRIDGE_REQUIREMENT}); found "
            f"{version}. The ConfigContainer fields, DatasetProvider contract and gpt_step "
            "forward step it relies on may differ.",
            stacklevel=2,
        )
    return version


# --------------------------------------------------------------------------------------------
# Settings and the plan (pure)
# --------------------------------------------------------------------------------------------

Mode = Literal["full", "input_only", "output_only"]
Weighting = Literal["uniform", "power", "exp", "first"]


@dataclass(frozen=True, kw_only=True)
class TSTBridgeConfig:
    """What TST adds to a Bridge recipe. Everything else keeps the recipe's meaning:
    `model.seq_length` is L (latent positions in phase 1), `train.train_iters` is N (both
    phases), `train.global_batch_size` counts samples of either phase."""

    bag_size: int
    """s: tokens averaged into one latent position in phase 1 (paper: 6 dense, 16 MoE)."""
    phase1_fraction: float = 0.3
    """r: fraction of train_iters spent in phase 1 (paper: 0.2-0.4); n1 = round(r * N)."""
    phase1_iters: Optional[int] = None
    """n1 directly, instead of phase1_fraction."""
    mode: Mode = "full"
    """"full" (the method), or the paper's "input_only" / "output_only" ablations."""
    weighting: Weighting = "uniform"
    """How the k targets of a latent position share its loss (see SuperpositionConfig)."""
    target_weights: Optional[Sequence[float]] = None
    """Explicit per-target weights (normalised to sum 1); overrides `weighting`."""
    mask_cross_document_targets: bool = False
    """Mask a target in a later document than the bag's last token (needs the tokenizer's
    end-of-document id, read from Bridge's tokenizer)."""

    def __post_init__(self):
        s = self.bag_size
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(
                f"TSTBridgeConfig.bag_size (s) must be an integer >= 1, got {s!r}: set it to a "
                "whole number such as 4 (s=1 is ordinary training; the paper uses s=6 for "
                "dense and s=16 for MoE models)"
            )
        if self.target_weights is not None:
            object.__setattr__(self, "target_weights", tuple(float(w) for w in self.target_weights))
        try:
            self.superposition()
        except ValueError as err:
            raise ValueError(f"TSTBridgeConfig: {err}") from None
        if self.phase1_iters is None:
            r = self.phase1_fraction
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (
                math.isfinite(r) and 0.0 < r < 1.0
            ):
                raise ValueError(
                    f"TSTBridgeConfig.phase1_fraction={r!r} must lie strictly between 0 and 1 "
                    "(paper: 0.2-0.4), or give phase1_iters instead"
                )
        else:
            n1 = self.phase1_iters
            if isinstance(n1, bool) or not isinstance(n1, int) or n1 < 1:
                raise ValueError(
                    f"TSTBridgeConfig.phase1_iters={n1!r} must be a whole number >= 1 (and "
                    "below cfg.train.train_iters); phase 1 of 0 steps is ordinary training"
                )

    def superposition(self):
        """The phase-1 `SuperpositionConfig`."""
        from nemo_tst.superposition.config import SuperpositionConfig

        return SuperpositionConfig(
            bag_size=self.bag_size,
            mode=self.mode,
            weighting=self.weighting,
            target_weights=self.target_weights,
            mask_cross_document_targets=self.mask_cross_document_targets,
        )

    def phase1_iterations(self, train_iters: int) -> int:
        """n1 for N = train_iters (the same rounding as `nemo-tst pretrain`)."""
        from nemo_tst.training.arguments import phase1_iterations

        return phase1_iterations(train_iters, fraction=self.phase1_fraction, iters=self.phase1_iters)


@dataclass(frozen=True)
class TSTRunPlan:
    """One TST run: the phase boundary, the phase-1 sample layout, the checkpoint directories."""

    tst: TSTBridgeConfig
    run_dir: str
    train_iters: int
    """N: iterations of both phases (cfg.train.train_iters)."""
    phase1_iters: int
    """n1: phase 1 is iterations [0, n1); Bridge exits after iteration n1."""
    global_batch_size: int
    seq_length: int
    """L: the model's sequence length; latent positions in phase 1, tokens in phase 2."""

    @property
    def core(self):
        """The `nemo_tst.training.arguments.TSTPlan` both integrations share."""
        from nemo_tst.training.arguments import TSTPlan

        return TSTPlan(
            superposition=self.tst.superposition(),
            seq_length=self.seq_length,
            global_batch_size=self.global_batch_size,
            train_iters=self.train_iters,
            phase1_iters=self.phase1_iters,
        )

    @property
    def phase1_dir(self) -> str:
        return os.path.join(self.run_dir, PHASE1_SUBDIR)

    @property
    def phase2_dir(self) -> str:
        return os.path.join(self.run_dir, PHASE2_SUBDIR)

    @property
    def phase1_samples(self) -> int:
        """Training samples of phase 1 (n1 x global batch); phase 2 starts at this sample."""
        return self.phase1_iters * self.global_batch_size

    @property
    def phase1_sample_tokens(self) -> int:
        """Tokens one phase-1 sample holds: s*L inputs + the last position's targets."""
        return self.tst.superposition().sample_length(self.seq_length)

    @property
    def dataset_sequence_length(self) -> int:
        """The `sequence_length` the phase-1 GPTDataset is built with (it yields that plus one
        token): a whole number of phase-2 samples of L + 1 tokens, at least one phase-1 sample."""
        from nemo_tst.training.data import item_sequence_length

        return item_sequence_length(self.core)

    @property
    def dataset_items(self) -> int:
        """GPTDataset samples (of dataset_sequence_length + 1 tokens) the whole run reads."""
        from nemo_tst.training.data import items_needed

        return items_needed(self.core)


# How a Bridge recipe spells the settings the shared run checks name (`check_plan`).
_BRIDGE_SETTING_NAMES = dict(
    train_iters="cfg.train.train_iters",
    phase1_iters="TSTBridgeConfig.phase1_iters",
    phase1_fraction="TSTBridgeConfig.phase1_fraction",
    bag_size="TSTBridgeConfig.bag_size",
    seq_length="cfg.model.seq_length",
    tensor_parallel="cfg.model.tensor_model_parallel_size",
    sequence_parallel="cfg.model.sequence_parallel=True",
    context_parallel="cfg.model.context_parallel_size",
    decay_iters="cfg.scheduler.lr_decay_iters",
    wsd_decay_iters="cfg.scheduler.lr_wsd_decay_iters",
    mtp_num_layers="cfg.model.mtp_num_layers",
)


def plan_tst_run(
    tst: TSTBridgeConfig,
    *,
    run_dir: str,
    train_iters: Optional[int],
    global_batch_size: Optional[int],
    seq_length: int,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    context_parallel_size: int = 1,
    mtp_num_layers: Optional[int] = None,
    lr_decay_style: str = "linear",
    lr_decay_iters: Optional[int] = None,
    lr_wsd_decay_iters: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> TSTRunPlan:
    """Check the TST settings against the recipe's numbers and return the plan.

    Plain numbers in, so it runs without Bridge; `tst_phase_configs` passes the recipe's
    `cfg.train`, `cfg.model` and `cfg.scheduler` values. Raises ValueError naming the setting
    and the fix; the checks `nemo-tst pretrain` makes too are `check_plan`'s, shared.
    """
    from nemo_tst.training.arguments import SettingNames, check_plan

    if not isinstance(tst, TSTBridgeConfig):
        raise TypeError(f"tst must be a TSTBridgeConfig, got {type(tst).__name__}")
    if not run_dir:
        raise ValueError(
            "the TST run needs a checkpoint directory DIR (phase 1 saves to DIR/phase1, phase 2 "
            "to DIR/phase2): set cfg.checkpoint.save or pass run_dir="
        )
    if train_iters is None or isinstance(train_iters, bool) or train_iters < 2:
        raise ValueError(
            f"cfg.train.train_iters={train_iters!r}: TST plans in iterations and needs at least "
            "2 (one per phase); set cfg.train.train_iters (train_samples and num_epochs are not "
            "supported)"
        )
    if not global_batch_size:
        raise ValueError(
            "cfg.train.global_batch_size must be set explicitly: the phase boundary is n1 x the "
            "global batch samples into the data stream"
        )
    L, N = seq_length, train_iters
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"cfg.model.seq_length={L!r} must be a positive integer (L)")
    n1 = tst.phase1_iterations(N)
    wsd_anneal, wsd_note = None, ""
    if lr_decay_style == "WSD":
        decay = max_steps or lr_decay_iters or N
        if lr_wsd_decay_iters is None:
            wsd_anneal, wsd_note = (decay, decay), " (unset: Bridge anneals over the whole decay)"
        else:
            wsd_anneal = (decay, lr_wsd_decay_iters)
    check_plan(
        SettingNames(**_BRIDGE_SETTING_NAMES),
        train_iters=N,
        phase1_iters=n1,
        phase1_fraction=None if tst.phase1_iters is not None else tst.phase1_fraction,
        bag_size=tst.bag_size,
        seq_length=L,
        tensor_parallel=tensor_model_parallel_size,
        sequence_parallel=sequence_parallel,
        context_parallel=context_parallel_size,
        mtp_num_layers=mtp_num_layers,
        wsd_anneal=wsd_anneal,
        wsd_note=wsd_note,
    )
    return TSTRunPlan(
        tst=tst,
        run_dir=str(run_dir),
        train_iters=N,
        phase1_iters=n1,
        global_batch_size=int(global_batch_size),
        seq_length=L,
    )


# --------------------------------------------------------------------------------------------
# Checkpoint directories (pure; reads Bridge's tracker files)
# --------------------------------------------------------------------------------------------

_TRAIN_STATE_TRACKER = "latest_train_state.pt"  # Bridge's tracker: TrainState.state_dict()
_LEGACY_TRACKER = "latest_checkpointed_iteration.txt"  # Bridge writes it too, for Megatron-LM


def latest_checkpoint_iteration(checkpoint_dir: str | os.PathLike) -> Optional[int]:
    """The iteration of the last complete checkpoint Bridge saved in `checkpoint_dir`, or None.

    Bridge writes its trackers only once a save is complete, so an interrupted save is never
    counted. Reads `latest_train_state.pt` ({"step": tensor, ...}), else the Megatron-LM
    `latest_checkpointed_iteration.txt` ("release" counts as 0).
    """
    path = Path(checkpoint_dir)
    tracker = path / _TRAIN_STATE_TRACKER
    if tracker.is_file():
        import torch

        state = torch.load(tracker, map_location="cpu", weights_only=True)
        return int(state["step"])
    legacy = path / _LEGACY_TRACKER
    if legacy.is_file():
        text = legacy.read_text().strip()
        return 0 if text == "release" else int(text)
    return None


def phase2_load_dir(plan: TSTRunPlan) -> str:
    """Where phase 2 resumes from: its own directory once it saved, else phase 1's handoff."""
    return plan.phase2_dir if latest_checkpoint_iteration(plan.phase2_dir) is not None else plan.phase1_dir


def next_tst_phase(plan: TSTRunPlan) -> Optional[int]:
    """1 or 2: the phase a launch should run now, judged from the checkpoints; None when done."""
    n1, N = plan.phase1_iters, plan.train_iters
    p1, p2 = latest_checkpoint_iteration(plan.phase1_dir), latest_checkpoint_iteration(plan.phase2_dir)
    for where, it in ((plan.phase1_dir, p1), (plan.phase2_dir, p2)):
        if it is not None and it > N:
            raise ValueError(
                f"{where} holds a checkpoint of iteration {it}, past cfg.train.train_iters={N}: "
                "it belongs to another run; choose a new checkpoint directory"
            )
    if p1 is not None and p1 > n1:
        raise ValueError(
            f"{plan.phase1_dir} holds iteration {p1} but phase 1 ends at {n1}: the phase-1 "
            "length changed since this run started; rerun with the original phase1_fraction / "
            "phase1_iters and train_iters"
        )
    if p2 is not None:
        return None if p2 >= N else 2
    return 2 if p1 == n1 else 1


def check_phase_iteration(phase: int, iteration: int, plan: TSTRunPlan) -> None:
    """Refuse a training step outside its container's phase (checked by the forward step).

    `iteration` is Bridge's `train_state.step`: iterations finished before this one.
    """
    n1 = plan.phase1_iters
    if phase == 1 and iteration >= n1:
        raise RuntimeError(
            f"the phase-1 container is at iteration {iteration}, but phase 1 ended at iteration "
            f"{n1} (its checkpoint is in {plan.phase1_dir}); run the phase-2 container "
            "(tst_phase_configs(...)[1], or tst_pretrain(..., phase=2))"
        )
    if phase == 2 and iteration < n1:
        raise RuntimeError(
            f"the phase-2 container is at iteration {iteration}, but phase 2 starts from phase "
            f"1's checkpoint of iteration {n1} in {plan.phase1_dir}, which it did not find "
            f"(latest there: {latest_checkpoint_iteration(plan.phase1_dir)}); run phase 1 to "
            "its end first (tst_pretrain(..., phase=1)), then rebuild the phase-2 container"
        )


# --------------------------------------------------------------------------------------------
# Phase-1 pieces the forward step uses (pure torch)
# --------------------------------------------------------------------------------------------


def cp_zigzag_slice(tensors: dict, cp_rank: int, cp_size: int) -> dict:
    """Megatron's 2*cp zig-zag split along dim 1, as Bridge's `get_batch_on_this_cp_rank` does
    for sequences (rank r keeps chunks r and 2*cp-1-r); phase-1 tensors are split along latent
    positions, so with L % (2*cp) == 0 no bag is cut. The one implementation is
    `nemo_tst.training.step.split_for_context_parallel`."""
    from nemo_tst.training.step import split_for_context_parallel

    return split_for_context_parallel(tensors, cp_rank, cp_size)


def tst_phase1_loss(target_mask, target_weights, output_tensor):
    """Phase-1 loss in Bridge's loss-function contract, (loss sum, count, report): the same
    contract as Megatron-LM's, so this is `nemo_tst.training.step.phase1_loss_terms`."""
    from nemo_tst.training.step import phase1_loss_terms

    return phase1_loss_terms(target_mask, target_weights, output_tensor)


def _phase1_loss_checked(
    target_mask, target_weights, output_tensor, *, check_for_nan_in_loss=True, check_for_spiky_loss=False
):
    """`tst_phase1_loss` plus the NaN/Inf and spike checks Bridge's own loss makes."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    loss, count, report = tst_phase1_loss(target_mask, target_weights, output_tensor)
    rerun = get_rerun_state_machine()
    if check_for_nan_in_loss:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun.validate_result(
                result=loss,
                rejection_func=reject,
                message=f"found {what} in the local TST phase-1 (multi-hot) loss",
                tolerance=0.0,
                fatal=True,
            )
    if check_for_spiky_loss:
        rerun.validate_result(
            result=loss,
            rejection_func=partial(
                rerun.is_unexpectedly_large,
                threshold=getattr(rerun, "spiky_loss_factor", 10.0),
                context="tst loss",
            ),
            message="Spiky TST phase-1 loss",
            tolerance=0.0,
            fatal=False,
        )
    return loss, count, report


# --------------------------------------------------------------------------------------------
# Model hook (megatron.core only)
# --------------------------------------------------------------------------------------------


def _to_tst_model(module):
    """Make a built megatron-core GPTModel / HybridModel the TST class, in place."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from nemo_tst.superposition.model import SuperpositionModelMixin, TSTGPTModel, TSTHybridModel

    if isinstance(module, SuperpositionModelMixin):
        return module
    target = {GPTModel: TSTGPTModel, HybridModel: TSTHybridModel}.get(type(module))
    if target is None:
        raise TypeError(
            f"tst_model_hook: the model provider built a {type(module).__name__}; TST supports "
            "megatron-core's GPTModel (dense or MoE) and HybridModel as built, not subclasses or "
            "other model types"
        )
    # Only the class changes, as SuperpositionEmbedding.to_superposition does for the embedding:
    # no parameter is allocated or renamed, so phase 1 and phase 2 have the same state dict.
    module.__class__ = target
    module._add_superposition()
    return module


def tst_model_hook(model: list) -> list:
    """Bridge pre-wrap hook: the built model chunks become TST models (in phase 2 mode until the
    forward step sets the phase). Registered on the phase-1 container's model provider only."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        _to_tst_model(chunk)
    return model


def _tst_module(model):
    """The TST model inside DDP / Float16 wrappers, or None for a plain model."""
    from nemo_tst.superposition.model import SuperpositionModelMixin

    inner = model
    while not isinstance(inner, SuperpositionModelMixin) and hasattr(inner, "module"):
        inner = inner.module
    return inner if isinstance(inner, SuperpositionModelMixin) else None


def _add_pre_wrap_hook(model_cfg, hook) -> None:
    """On a ModelProviderMixin (`register_pre_wrap_hook`) or a ModelConfig (`pre_wrap_hooks`)."""
    if hasattr(model_cfg, "register_pre_wrap_hook"):
        if hook not in (getattr(model_cfg, "_pre_wrap_hooks", None) or []):
            model_cfg.register_pre_wrap_hook(hook)
    elif isinstance(getattr(model_cfg, "pre_wrap_hooks", None), list):
        if hook not in model_cfg.pre_wrap_hooks:
            model_cfg.pre_wrap_hooks.append(hook)
    else:
        raise TypeError(
            f"cfg.model ({type(model_cfg).__name__}) takes no pre-wrap hook; TST needs a "
            "GPTModelProvider / HybridModelProvider or a GPTModelConfig / HybridModelConfig"
        )


# --------------------------------------------------------------------------------------------
# Dataset provider (subclass of Bridge's DatasetProvider, created on first use)
# --------------------------------------------------------------------------------------------

_PROVIDER_CLASS = None


def _dataset_provider_class():
    global _PROVIDER_CLASS
    if _PROVIDER_CLASS is not None:
        return _PROVIDER_CLASS
    require_bridge()
    from megatron.bridge.data.base import DataloaderConfig, DatasetProvider

    @dataclass(kw_only=True)
    class TSTDatasetProvider(DatasetProvider):
        """Both phases' data over one token stream (`nemo_tst.training.data.TSTTrainDataset`).

        Training: GPTDataset samples ("items") of `dataset_sequence_length` + 1 tokens; sample
        j < n1 x global batch is item j cut to one phase-1 sample {"text", "loss_mask"}, later
        samples are ordinary {"tokens", "labels", "loss_mask", "position_ids"} pieces of L + 1
        tokens of the following items, so phase 2 continues where phase 1 stopped and a resume
        in either phase reads what the uninterrupted run would. Validation and test are the
        recipe's GPTDataset at L. `base` is the recipe's GPTDatasetConfig (seq_length L).
        """

        base: Any
        tst_phase: int
        run_dir: str
        bag_size: int
        mode: str = "full"
        weighting: str = "uniform"
        target_weights: Optional[list] = None
        mask_cross_document_targets: bool = False
        seq_length: int
        global_batch_size: int
        train_iters: int
        phase1_iters: int

        @classmethod
        def from_recipe(cls, dataset_cfg, plan: TSTRunPlan, phase: int):
            tst = plan.tst
            loader = {f.name: getattr(dataset_cfg, f.name) for f in fields(DataloaderConfig) if f.init}
            return cls(
                **loader,
                base=copy.deepcopy(dataset_cfg),
                tst_phase=phase,
                run_dir=plan.run_dir,
                bag_size=tst.bag_size,
                mode=tst.mode,
                weighting=tst.weighting,
                target_weights=None if tst.target_weights is None else list(tst.target_weights),
                mask_cross_document_targets=tst.mask_cross_document_targets,
                seq_length=plan.seq_length,
                global_batch_size=plan.global_batch_size,
                train_iters=plan.train_iters,
                phase1_iters=plan.phase1_iters,
            )

        def run_plan(self) -> TSTRunPlan:
            tst = TSTBridgeConfig(
                bag_size=self.bag_size,
                phase1_iters=self.phase1_iters,
                mode=self.mode,
                weighting=self.weighting,
                target_weights=self.target_weights,
                mask_cross_document_targets=self.mask_cross_document_targets,
            )
            return TSTRunPlan(
                tst=tst,
                run_dir=self.run_dir,
                train_iters=self.train_iters,
                phase1_iters=self.phase1_iters,
                global_batch_size=self.global_batch_size,
                seq_length=self.seq_length,
            )

        def finalize(self) -> None:
            DataloaderConfig.finalize(self)
            copy.deepcopy(self.base).finalize()  # the recipe dataset's own checks, now

        def _gpt_config(self, sequence_length: int, tokenizer):
            cfg = copy.deepcopy(self.base)
            cfg.seq_length = sequence_length
            cfg.finalize()
            cfg.tokenizer = tokenizer
            if getattr(cfg, "token_dtype_code", 0) is None and getattr(tokenizer, "vocab_size", None):
                import numpy

                cfg.token_dtype_code = 4 if tokenizer.vocab_size > numpy.iinfo(numpy.uint16).max + 1 else 8
            return cfg

        def build_datasets(self, context):
            from megatron.core.datasets.blended_megatron_dataset_builder import (
                BlendedMegatronDatasetBuilder,
            )
            from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

            from nemo_tst.training.data import TSTTrainDataset

            plan = self.run_plan()
            items_cfg = self._gpt_config(plan.dataset_sequence_length, context.tokenizer)
            eval_cfg = self._gpt_config(plan.seq_length, context.tokenizer)
            dataset_type = MockGPTDataset if items_cfg.mock else GPTDataset
            # Every rank builds and reads the data, as Bridge's own GPT provider does (each
            # tensor-parallel rank reads the same samples; no broadcast). The split each builder
            # does not need is asked for 1 sample, not None: megatron-core refuses a None size
            # for a weighted blend.
            items, _, _ = BlendedMegatronDatasetBuilder(
                dataset_type, [plan.dataset_items, 1, 1], lambda: True, items_cfg
            ).build()
            _, valid, test = BlendedMegatronDatasetBuilder(
                dataset_type, [1, context.valid_samples, context.test_samples], lambda: True, eval_cfg
            ).build()
            train = None if items is None else TSTTrainDataset(items, plan.core)
            return train, valid, test

    TSTDatasetProvider.__module__ = __name__
    TSTDatasetProvider.__qualname__ = "TSTDatasetProvider"
    _PROVIDER_CLASS = TSTDatasetProvider
    return TSTDatasetProvider


def __getattr__(name: str):
    # `nemo_tst.bridge.TSTDatasetProvider` resolves (with Bridge installed) so that the class
    # path Bridge writes into run_config.yaml, and pickling, find it.
    if name == "TSTDatasetProvider":
        return _dataset_provider_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# The two phase containers
# --------------------------------------------------------------------------------------------


def _check_recipe(cfg, run_dir: Optional[str]) -> None:
    """Bridge settings TST cannot honour, refused up front with the fix."""
    from megatron.bridge.training.config import GPTDatasetConfig
    from megatron.bridge.utils.cuda_graph import is_full_iteration_cuda_graph

    ds = cfg.dataset
    if not isinstance(ds, GPTDatasetConfig) or hasattr(ds, "fim_data"):
        raise ValueError(
            f"cfg.dataset is a {type(ds).__name__}; TST pretraining needs a GPTDatasetConfig "
            "(indexed or mock pretraining data, as the pretrain recipes use), not SFT, FIM, "
            "packed or Energon data"
        )
    if ds.dataloader_type != "single":
        raise ValueError(
            f"cfg.dataset.dataloader_type={ds.dataloader_type!r}: the phase of a sample is its "
            "index in the data stream, which only the sequential sampler keeps; set "
            "cfg.dataset.dataloader_type = \"single\""
        )
    for name in ("reset_position_ids", "reset_attention_mask", "inter_document_masking", "hybrid_context_parallel"):
        if getattr(ds, name, False):
            raise ValueError(
                f"cfg.dataset.{name}=True is not supported: phase-1 positions are latent "
                f"positions 0..L-1 over bags that may span documents; set it to False"
            )
    if not getattr(ds, "add_extra_token_to_sequence", True):
        raise ValueError(
            "cfg.dataset.add_extra_token_to_sequence=False: TST reads each sample with its "
            "target token; set it to True"
        )
    train = cfg.train
    for name, fix in (
        ("train_samples", "give cfg.train.train_iters instead"),
        ("num_epochs", "give cfg.train.train_iters instead"),
        ("rampup_batch_size", "remove it: phase boundaries count samples of a fixed global batch"),
        ("step_batch_size_schedule", "remove it: phase boundaries count samples of a fixed global batch"),
        ("exit_interval", "remove it: phase 1 uses exit_interval to stop at n1; use "
                          "exit_duration_in_mins or the exit signal handler to cut a job short"),
    ):
        if getattr(train, name, None):
            raise ValueError(f"cfg.train.{name}={getattr(train, name)!r} is not supported with TST; {fix}")
    ckpt = cfg.checkpoint
    if not (run_dir or ckpt.save):
        raise ValueError(
            "cfg.checkpoint.save is not set: TST saves phase 1 to DIR/phase1 and phase 2 to "
            "DIR/phase2; set cfg.checkpoint.save = DIR (or pass run_dir=)"
        )
    if ckpt.finetune or cfg.peft is not None:
        raise ValueError(
            "cfg.checkpoint.finetune / cfg.peft: TST is a pretraining recipe and phase 2 must "
            "resume phase 1 (optimizer, scheduler, iteration); turn finetuning and PEFT off"
        )
    if ckpt.ckpt_step is not None:
        raise ValueError(
            f"cfg.checkpoint.ckpt_step={ckpt.ckpt_step}: each phase resumes from the latest "
            "checkpoint of its own directory; remove ckpt_step"
        )
    if not ckpt.save_optim:
        raise ValueError(
            "cfg.checkpoint.save_optim=False: phase 2 resumes phase 1's optimizer state; set "
            "save_optim=True"
        )
    if ckpt.non_persistent_ckpt_type is not None:
        raise ValueError(
            f"cfg.checkpoint.non_persistent_ckpt_type={ckpt.non_persistent_ckpt_type!r}: "
            "non-persistent checkpoints are not separated per phase; set it to None"
        )
    overlap = bool(getattr(cfg.model, "overlap_moe_expert_parallel_comm", False))
    if cfg.comm_overlap is not None:
        overlap = overlap or bool(getattr(cfg.comm_overlap, "overlap_moe_expert_parallel_comm", False))
    if overlap:
        raise ValueError(
            "overlap_moe_expert_parallel_comm (cfg.model / cfg.comm_overlap) builds a schedule "
            "plan from token ids, which phase 1 does not have; set it to False"
        )
    if is_full_iteration_cuda_graph(cfg.model):
        raise ValueError(
            "full-iteration CUDA graphs (cfg.model.cuda_graph_impl / cuda_graph_scope) capture "
            "the data path, which differs in phase 1; use per-layer scopes or cuda_graph_impl="
            "\"none\""
        )


def tst_phase_configs(cfg, tst: TSTBridgeConfig, *, run_dir: Optional[str] = None):
    """(phase1_cfg, phase2_cfg): deep copies of a Bridge pretrain `ConfigContainer` for TST.

    Phase 1: train_iters stays N and the scheduler is untouched (one schedule over both phases,
    so Bridge's scheduler checks pass on the handoff); train.exit_interval = n1, on which Bridge
    saves and exits; checkpoint save/load DIR/phase1; the model provider gets `tst_model_hook`.
    Phase 2: a resume of DIR/phase1 (or of DIR/phase2 once it has a checkpoint: build this
    container in the process that runs phase 2), saving to DIR/phase2, plain model. Both:
    `TSTDatasetProvider` over the recipe's dataset; model.seq_length stays L.
    `cfg` itself is not modified. DIR is `run_dir`, else `cfg.checkpoint.save`.
    """
    require_bridge()
    from megatron.bridge.training.config import ConfigContainer

    if not isinstance(cfg, ConfigContainer):
        raise TypeError(f"cfg must be a megatron.bridge ConfigContainer, got {type(cfg).__name__}")
    _check_recipe(cfg, run_dir)
    model, sched = cfg.model, cfg.scheduler
    plan = plan_tst_run(
        tst,
        run_dir=run_dir or cfg.checkpoint.save,
        train_iters=cfg.train.train_iters,
        global_batch_size=cfg.train.global_batch_size,
        seq_length=model.seq_length,
        tensor_model_parallel_size=getattr(model, "tensor_model_parallel_size", 1),
        sequence_parallel=bool(getattr(model, "sequence_parallel", False)),
        context_parallel_size=getattr(model, "context_parallel_size", 1),
        mtp_num_layers=getattr(model, "mtp_num_layers", None),
        lr_decay_style=sched.lr_decay_style,
        lr_decay_iters=sched.lr_decay_iters,
        lr_wsd_decay_iters=sched.lr_wsd_decay_iters,
        max_steps=getattr(sched, "max_steps", None),
    )
    provider_cls = _dataset_provider_class()
    phase1, phase2 = copy.deepcopy(cfg), copy.deepcopy(cfg)
    phase1.dataset = provider_cls.from_recipe(cfg.dataset, plan, 1)
    phase2.dataset = provider_cls.from_recipe(cfg.dataset, plan, 2)

    phase1.train.exit_interval = plan.phase1_iters
    phase1.checkpoint.save = plan.phase1_dir
    phase1.checkpoint.load = plan.phase1_dir  # a restarted phase 1 resumes itself
    _add_pre_wrap_hook(phase1.model, tst_model_hook)

    phase2.checkpoint.save = plan.phase2_dir
    phase2.checkpoint.load = phase2_load_dir(plan)
    phase2.checkpoint.pretrained_checkpoint = None  # never a silent fine-tune from elsewhere
    phase2.checkpoint.finetune = False
    phase2.checkpoint.load_optim = True
    phase2.checkpoint.load_main_params_from_ckpt = False  # Bridge allows it only without load_optim
    phase2.checkpoint.load_rng = True
    return phase1, phase2


# --------------------------------------------------------------------------------------------
# Forward step
# --------------------------------------------------------------------------------------------


def _tst_provider(cfg):
    provider = getattr(cfg, "dataset", None)
    if type(provider).__name__ != "TSTDatasetProvider" or not hasattr(provider, "run_plan"):
        raise TypeError(
            "tst_forward_step needs a container built by nemo_tst.bridge.tst_phase_configs "
            f"(cfg.dataset is a TSTDatasetProvider); got cfg.dataset = {type(provider).__name__}"
        )
    return provider


def tst_forward_step(state: "GlobalState", data_iterator, model, return_schedule_plan: bool = False):  # noqa: F821
    """Bridge forward step for both TST phases (pass it to `pretrain` with either container).

    Phase-1 training batches ({"text", "loss_mask"}): superposition batch, the model's
    multi-hot loss [b, L, k], and `tst_phase1_loss` as the loss function. Every other batch
    (phase 2, validation, test) goes to Bridge's `gpt_step.forward_step` unchanged, with a TST
    model switched to its vanilla forward. Pipeline stages that read no data are left to Bridge.
    """
    require_bridge()
    import torch
    from megatron.bridge.training import gpt_step
    from megatron.bridge.training.utils.flop_utils import (
        accumulate_flops_metadata,
        get_model_chunk_vp_stage,
    )
    from megatron.bridge.training.utils.pg_utils import get_pg_collection
    from megatron.core.pipeline_parallel.utils import (
        is_pp_first_stage,
        is_pp_last_stage,
        is_vp_first_stage,
        is_vp_last_stage,
    )

    from nemo_tst.superposition import make_superposition_batch, set_superposition

    provider = _tst_provider(state.cfg)
    plan = provider.run_plan()
    if model.training:
        check_phase_iteration(provider.tst_phase, state.train_state.step, plan)
    tst_model = _tst_module(model) is not None

    # The stage roles exactly as gpt_step.get_batch computes them, so this step reads a batch
    # on the same stages Bridge's does.
    vp_stage = get_model_chunk_vp_stage(model)
    pg_collection = get_pg_collection(model)
    vp_size = getattr(state.cfg.model, "virtual_pipeline_model_parallel_size", None)
    is_first = is_pp_first_stage(pg_collection.pp) and (
        vp_stage is None or is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size)
    )
    is_last = is_pp_last_stage(pg_collection.pp) and (
        vp_stage is None or is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size)
    )
    if not (is_first or is_last):
        # Middle stages run the transformer on L positions in both phases and read no data.
        if tst_model:
            set_superposition(model, None)
        return gpt_step.forward_step(state, data_iterator, model, return_schedule_plan)

    batch = next(data_iterator)
    if "text" not in batch:
        if tst_model:
            set_superposition(model, None)
        return gpt_step.forward_step(state, iter([batch]), model, return_schedule_plan)

    if not tst_model:
        raise RuntimeError(
            "a phase-1 batch reached a plain GPTModel: the phase-1 container's model provider "
            "needs nemo_tst.bridge.tst_model_hook; build both containers with tst_phase_configs"
        )
    if return_schedule_plan:
        raise ValueError(
            "overlap_moe_expert_parallel_comm asks for a schedule plan, which phase 1 cannot "
            "build; set it to False in cfg.model / cfg.comm_overlap"
        )
    config = plan.tst.superposition()
    eod_id = state.tokenizer.eod if config.mask_cross_document_targets else None

    timers = state.timers
    timers("batch-generator", log_level=2).start()
    text = batch["text"].cuda(non_blocking=True).long()
    loss_mask = batch["loss_mask"].cuda(non_blocking=True).float()
    tst = make_superposition_batch(text, config, loss_mask=loss_mask, eod_id=eod_id)
    timers("batch-generator").stop()
    # FLOPs: the transformer runs on L latent positions.
    accumulate_flops_metadata(state, tst.position_ids, vp_stage=vp_stage, config_seq_len=plan.seq_length)

    inputs = cp_zigzag_slice(
        {
            "input_ids": tst.input_ids,
            "position_ids": tst.position_ids,
            "targets": tst.targets,
            "target_mask": tst.target_mask,
        },
        pg_collection.cp.rank(),
        pg_collection.cp.size(),
    )
    set_superposition(model, config)
    with state.straggler_timer:
        output = model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=None,
            labels=inputs["targets"],
        )
    weights = torch.tensor(config.weights(), dtype=torch.float32, device=inputs["target_mask"].device)
    rerun_cfg = state.cfg.rerun_state_machine
    loss_func = partial(
        _phase1_loss_checked,
        inputs["target_mask"],
        weights,
        check_for_nan_in_loss=rerun_cfg.check_for_nan_in_loss,
        check_for_spiky_loss=rerun_cfg.check_for_spiky_loss,
    )
    return output, loss_func


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------


def tst_pretrain(
    cfg,
    tst: TSTBridgeConfig,
    *,
    phase: Literal["next", 1, 2] = "next",
    run_dir: Optional[str] = None,
    callbacks=None,
) -> Optional[int]:
    """Run one TST phase with Bridge's `pretrain`; returns the phase run, None if all done.

    phase="next" picks from the checkpoints: phase 1 until DIR/phase1 holds iteration n1, then
    phase 2 until DIR/phase2 holds N. Phase 1 ends in Bridge's exit at n1 (the process exits
    after saving), so call this once per launch: the same command, run twice, trains both
    phases, and a rerun after a crash resumes where the run stopped.
    """
    require_bridge()
    from megatron.bridge.training.pretrain import pretrain

    phase1, phase2 = tst_phase_configs(cfg, tst, run_dir=run_dir)
    plan = phase1.dataset.run_plan()
    which = next_tst_phase(plan) if phase == "next" else phase
    if which not in (None, 1, 2):
        raise ValueError(f"phase must be 'next', 1 or 2, got {phase!r}")
    if which is None:
        print(f"[tst] {plan.run_dir}: both phases are complete ({plan.train_iters} iterations)", flush=True)
        return None
    print(
        f"[tst] phase {which}: s={tst.bag_size}, L={plan.seq_length}, iterations "
        f"{'0' if which == 1 else plan.phase1_iters}..{plan.phase1_iters if which == 1 else plan.train_iters}"
        f" of {plan.train_iters}, checkpoints in {plan.phase1_dir if which == 1 else plan.phase2_dir}",
        flush=True,
    )
    pretrain(phase1 if which == 1 else phase2, tst_forward_step, callbacks=callbacks)
    return which
