"""The two phase containers of a Bridge recipe, and one launch of the next phase.

    tst_phase_configs(cfg, tst)   recipe ConfigContainer -> (phase-1, phase-2) deep copies
        phase 1   train.train_iters = N (one LR/WD schedule, scheduler untouched),
                  train.exit_interval = n1 (Bridge saves and exits at n1),
                  checkpoint.save = checkpoint.load = phase 1's directory of the run
                  directory DIR (`RunDirectory`), model pre-wrap hook
                  `tst_model_hook` (GPTModel -> TSTGPTModel in place)
        phase 2   checkpoint.load = where phase 2 resumes (`RunDirectory.phase2_source`): a
                  resume (weights, optimizer, scheduler, RNG, iteration, consumed samples), no
                  finetune, no pretrained_checkpoint; checkpoint.save = phase 2's directory
        both      dataset = TSTDatasetProvider over the recipe's GPTDatasetConfig;
                  model.seq_length stays L
    tst_pretrain(cfg, tst)        runs the next unfinished phase with Bridge's `pretrain`

At s = 1 there is no phase 1 (`run_phases`): the phase-2 container is the whole run, in one
launch, and takes the model hook itself (its first n1 x B samples take phase 1's code path
with bags of one token, i.e. ordinary training).
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

from nemo_tst.bridge.checks import BRIDGE_NAMES, check_recipe, plan_tst_run, require_bridge
from nemo_tst.bridge.provider import dataset_provider_class
from nemo_tst.bridge.step import tst_forward_step
from nemo_tst.core.plan import TSTPlan, run_phases
from nemo_tst.core.run_dir import RunDirectory
from nemo_tst.core.settings import TSTSettings
from nemo_tst.megatron_fixes import apply_megatron_fixes

__all__ = ["next_tst_phase", "tst_model_hook", "tst_phase_configs", "tst_pretrain"]


def tst_model_hook(model: list) -> list:
    """Bridge pre-wrap hook: the built model chunks become TST models (in phase 2 mode until the
    forward step sets the phase)."""
    from nemo_tst.superposition import as_tst_model

    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        as_tst_model(chunk)
    return model


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


def next_tst_phase(run_dir, plan: TSTPlan) -> Optional[int]:
    """1 or 2: the phase a launch should run now, judged from the checkpoints; None when done."""
    todo = RunDirectory(run_dir).phases_to_run(plan, BRIDGE_NAMES)
    return todo[0] if todo else None


def tst_phase_configs(cfg, tst: TSTSettings, *, run_dir: Optional[str] = None):
    """(phase1_cfg, phase2_cfg): deep copies of a Bridge pretrain `ConfigContainer` for TST
    (see the module docstring). Build them in the process that runs the phase: phase 2's load
    directory is judged from the checkpoints on disk. `cfg` itself is not modified. DIR is
    `run_dir`, else `cfg.checkpoint.save`."""
    require_bridge()
    from megatron.bridge.training.config import ConfigContainer

    if not isinstance(cfg, ConfigContainer):
        raise TypeError(f"cfg must be a megatron.bridge ConfigContainer, got {type(cfg).__name__}")
    check_recipe(cfg, run_dir)
    model, sched = cfg.model, cfg.scheduler
    root = run_dir or cfg.checkpoint.save
    plan = plan_tst_run(
        tst,
        run_dir=root,
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
    provider_cls = dataset_provider_class()
    phase1, phase2 = copy.deepcopy(cfg), copy.deepcopy(cfg)
    phase1.dataset = provider_cls.from_recipe(cfg.dataset, plan, root, 1)
    phase2.dataset = provider_cls.from_recipe(cfg.dataset, plan, root, 2)

    run_directory = RunDirectory(root)
    p1_dir, p2_dir = str(run_directory.phase_dir(1)), str(run_directory.phase_dir(2))
    phase1.train.exit_interval = plan.phase1_iters
    phase1.checkpoint.save = p1_dir
    phase1.checkpoint.load = p1_dir  # a restarted phase 1 resumes itself
    _add_pre_wrap_hook(phase1.model, tst_model_hook)

    phase2.checkpoint.save = p2_dir
    phase2.checkpoint.load = str(run_directory.phase2_source(plan))
    phase2.checkpoint.pretrained_checkpoint = None  # never a silent fine-tune from elsewhere
    phase2.checkpoint.finetune = False
    phase2.checkpoint.load_optim = True
    phase2.checkpoint.load_main_params_from_ckpt = False  # Bridge allows it only without load_optim
    phase2.checkpoint.load_rng = True
    if 1 not in run_phases(plan):
        _add_pre_wrap_hook(phase2.model, tst_model_hook)  # s = 1: phase 2 is the whole run
    return phase1, phase2


def tst_pretrain(
    cfg,
    tst: TSTSettings,
    *,
    phase: Literal["next", 1, 2] = "next",
    run_dir: Optional[str] = None,
    callbacks=None,
) -> Optional[int]:
    """Run one TST phase with Bridge's `pretrain`; returns the phase run, None if all done.

    phase="next" picks from the checkpoints: phase 1 until its directory holds iteration n1,
    then phase 2 until its directory holds N (at s = 1, phase 2 only). Phase 1 ends in Bridge's exit
    at n1 (the process exits after saving), so call this once per launch: the same command,
    run twice, trains both phases, and a rerun after a crash resumes where the run stopped.
    """
    require_bridge()
    from megatron.bridge.training.pretrain import pretrain

    if phase not in ("next", 1, 2):
        raise ValueError(f"phase must be 'next', 1 or 2, got {phase!r}")
    phase1, phase2 = tst_phase_configs(cfg, tst, run_dir=run_dir)
    plan, root = phase1.dataset.plan, phase1.dataset.run_dir
    which = next_tst_phase(root, plan) if phase == "next" else phase
    if which is None:
        print(f"[tst] {root}: the run is complete ({plan.train_iters} iterations)", flush=True)
        return None
    first = plan.phase1_iters if which == 2 and 1 in run_phases(plan) else 0
    last = plan.phase1_iters if which == 1 else plan.train_iters
    print(
        f"[tst] phase {which}: s={tst.bag_size}, L={plan.seq_length}, iterations {first}..{last} "
        f"of {plan.train_iters}, checkpoints in {RunDirectory(root).phase_dir(which)}",
        flush=True,
    )
    apply_megatron_fixes()
    pretrain(phase1 if which == 1 else phase2, tst_forward_step, callbacks=callbacks)
    return which
