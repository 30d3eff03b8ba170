"""What a Megatron-Bridge recipe must be for TST, checked before anything is built.

`plan_tst_run` takes plain numbers, so it runs without Bridge; `check_recipe` reads a Bridge
`ConfigContainer` (Bridge installed). Errors name the recipe field (`BRIDGE_NAMES`).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from nemo_tst.core.plan import TSTPlan, check_plan, run_phases
from nemo_tst.core.run_dir import RunDirectory
from nemo_tst.core.settings import SettingNames, TSTSettings
from nemo_tst.errors import RunFailed

__all__ = [
    "BRIDGE_COMMIT", "BRIDGE_NAMES", "BRIDGE_REQUIREMENT", "BRIDGE_TESTED", "BRIDGE_VERSION", "check_phase_iteration",
    "check_recipe", "plan_tst_run", "require_bridge",
]

BRIDGE_VERSION = "0.6.0"
"""The Megatron-Bridge release whose source this adapter was written against."""
BRIDGE_COMMIT = "51885cf132b2814188b6855c25a8588254274c2a"
"""Tag v0.6.0 of github.com/NVIDIA-NeMo/Megatron-Bridge."""
BRIDGE_REQUIREMENT = "megatron-bridge>=0.6,<0.7"
BRIDGE_TESTED = "0.6.2"
"""The release the tests train through (scripts/setup.sh installs it)."""
_TESTED_LINE = "0.6"
_UNTESTED_OK = "NEMO_TST_BRIDGE_UNTESTED"

_MISSING_BRIDGE = (
    "nemo_tst.bridge needs NVIDIA Megatron-Bridge (the `megatron.bridge` package), which could "
    "not be imported here ({error}). This adapter targets Megatron-Bridge 0.6.x (tested with "
    "{tested}; written against tag v{version}, commit {commit_short}, on megatron-core 0.19): "
    "NVIDIA NeMo containers ship it; elsewhere `bash scripts/setup.sh test,bridge` installs "
    "it (docs/bridge.md says why not plain `pip install \"{requirement}\"`). Megatron-Bridge "
    "imports transformer_engine unguarded, so it needs NVIDIA Transformer Engine "
    "(`pip install --no-build-isolation \"transformer-engine[pytorch]\"`, which needs CUDA). "
    "Without Bridge, run TST through Megatron-LM's trainer: `nemo-tst pretrain`."
)

BRIDGE_NAMES = SettingNames(
    setting="TSTSettings.{name}",
    train_iters="cfg.train.train_iters",
    seq_length="cfg.model.seq_length",
    tensor_parallel="cfg.model.tensor_model_parallel_size",
    sequence_parallel="cfg.model.sequence_parallel=True",
    context_parallel="cfg.model.context_parallel_size",
    decay_iters="cfg.scheduler.lr_decay_iters",
    wsd_decay_iters="cfg.scheduler.lr_wsd_decay_iters",
    mtp_num_layers="cfg.model.mtp_num_layers",
    run_dir="cfg.checkpoint.save",
)
"""How a Bridge recipe spells the settings the shared checks name."""

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
                tested=BRIDGE_TESTED,
                version=BRIDGE_VERSION,
                commit_short=BRIDGE_COMMIT[:7],
            )
        ) from err
    version = str(getattr(bridge, "__version__", "unknown"))
    if version.split(".")[:2] != _TESTED_LINE.split("."):
        # The adapter leans on Bridge internals (the DatasetProvider contract, gpt_step's
        # forward step, exit_interval's save-and-exit, the checkpoint tracker) whose change
        # would break a phase handoff silently, mid-run, rather than fail at start.
        message = (
            f"nemo_tst.bridge is tested with Megatron-Bridge {_TESTED_LINE}.x ({BRIDGE_TESTED}); "
            f"found Megatron-Bridge {version}: install {BRIDGE_REQUIREMENT}, or set "
            f"{_UNTESTED_OK}=1 to run anyway"
        )
        if os.environ.get(_UNTESTED_OK) != "1":
            raise ImportError(message)
        if not _version_warned:
            _version_warned = True
            warnings.warn(message, stacklevel=2)
    return version


def plan_tst_run(
    tst: TSTSettings,
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
) -> TSTPlan:
    """Check the TST settings against a recipe's numbers and return the plan.

    `tst_phase_configs` passes the recipe's `cfg.train`, `cfg.model` and `cfg.scheduler`
    values. Raises ValueError naming the recipe field and the fix; the checks `nemo-tst
    pretrain` makes too are `check_plan`'s, shared."""
    if not isinstance(tst, TSTSettings):
        raise TypeError(f"tst must be a nemo_tst.core.settings.TSTSettings, got {type(tst).__name__}")
    if not run_dir:
        raise ValueError(
            "the TST run needs a run directory DIR (each phase saves its checkpoints under "
            "it): set cfg.checkpoint.save or pass run_dir="
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
    wsd_anneal, wsd_note = None, ""
    if lr_decay_style == "WSD":
        decay = max_steps or lr_decay_iters or N
        if lr_wsd_decay_iters is None:
            wsd_anneal, wsd_note = (decay, decay), " (unset: Bridge anneals over the whole decay)"
        else:
            wsd_anneal = (decay, lr_wsd_decay_iters)
    return check_plan(
        BRIDGE_NAMES,
        tst,
        train_iters=N,
        seq_length=L,
        global_batch_size=global_batch_size,
        tensor_parallel=tensor_model_parallel_size,
        sequence_parallel=sequence_parallel,
        context_parallel=context_parallel_size,
        mtp_num_layers=mtp_num_layers,
        wsd_anneal=wsd_anneal,
        wsd_note=wsd_note,
    )


def check_phase_iteration(phase: int, iteration: int, plan: TSTPlan, run_dir) -> None:
    """Refuse a training step outside its container's phase (checked by the forward step).

    `iteration` is Bridge's `train_state.step`: iterations finished before this one. At s = 1
    the phase-2 container runs the whole run."""
    n1, p1_dir = plan.phase1_iters, RunDirectory(run_dir).phase_dir(1)
    if phase == 1 and iteration >= n1:
        raise RunFailed(
            f"the phase-1 container is at iteration {iteration}, but phase 1 ended at iteration "
            f"{n1} (its checkpoint is in {p1_dir}); run the phase-2 container "
            "(tst_phase_configs(...)[1], or tst_pretrain(..., phase=2))"
        )
    if phase == 2 and iteration < n1 and 1 in run_phases(plan):
        raise RunFailed(
            f"the phase-2 container is at iteration {iteration}, but phase 2 starts from phase "
            f"1's checkpoint of iteration {n1} in {p1_dir}, which it did not find "
            f"(latest there: {RunDirectory(run_dir).latest(1)}); run phase 1 to its end first "
            "(tst_pretrain(..., phase=1)), then rebuild the phase-2 container"
        )


def check_recipe(cfg, run_dir: Optional[str]) -> None:
    """Bridge settings TST cannot honour, refused up front with the fix (Bridge installed)."""
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
            "cfg.checkpoint.save is not set: TST saves each phase's checkpoints under one run "
            "directory DIR; set cfg.checkpoint.save = DIR (or pass run_dir=)"
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
