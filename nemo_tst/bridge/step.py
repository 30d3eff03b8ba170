"""The Bridge forward step for both TST phases: `tst_forward_step`."""

from __future__ import annotations

from functools import partial

from nemo_tst.bridge.checks import check_phase_iteration, require_bridge
from nemo_tst.core.data import batch_device
from nemo_tst.core.loss import check_finite_loss, phase1_loss_terms
from nemo_tst.core.step import phase1_forward

__all__ = ["tst_forward_step"]


def _tst_provider(cfg):
    provider = getattr(cfg, "dataset", None)
    if type(provider).__name__ != "TSTDatasetProvider" or not hasattr(provider, "plan"):
        raise TypeError(
            "tst_forward_step needs a container built by nemo_tst.bridge.tst_phase_configs "
            f"(cfg.dataset is a TSTDatasetProvider); got cfg.dataset = {type(provider).__name__}"
        )
    return provider


def phase1_loss_func(target_mask, target_weights, output_tensor, *, check_for_nan_in_loss=True,
                     spiky_loss_factor=None):
    """Phase 1's loss (`phase1_loss_terms`) with the checks Bridge's own loss makes."""
    loss, count, report = phase1_loss_terms(target_mask, target_weights, output_tensor)
    if check_for_nan_in_loss:
        check_finite_loss(loss, what="TST phase-1 (multi-hot) loss", spiky_loss_factor=spiky_loss_factor)
    return loss, count, report


def tst_forward_step(state: "GlobalState", data_iterator, model, return_schedule_plan: bool = False):  # noqa: F821
    """Bridge forward step for both TST phases (pass it to `pretrain` with either container).

    Phase-1 training batches ({"text", "loss_mask"}): superposition batch, the model's
    multi-hot loss [b, L, k], and the phase-1 loss function. Every other batch (phase 2,
    validation, test) goes to Bridge's `gpt_step.forward_step` unchanged, with a TST model
    switched to its vanilla forward. Pipeline stages that read no data are left to Bridge.
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

    from nemo_tst.superposition import set_superposition, tst_module

    provider = _tst_provider(state.cfg)
    plan = provider.plan
    if model.training:
        check_phase_iteration(provider.tst_phase, state.train_state.step, plan, provider.run_dir)
    tst_model = tst_module(model) is not None

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
        raise ValueError(
            "a phase-1 batch reached a plain GPTModel: the container's model provider needs "
            "nemo_tst.bridge.tst_model_hook; build the containers with tst_phase_configs"
        )
    if return_schedule_plan:
        raise ValueError(
            "overlap_moe_expert_parallel_comm asks for a schedule plan, which phase 1 cannot "
            "build; set it to False in cfg.model / cfg.comm_overlap"
        )
    config = plan.superposition
    eod_id = state.tokenizer.eod if config.mask_cross_document_targets else None

    timers = state.timers
    timers("batch-generator", log_level=2).start()
    device = batch_device(model)
    text = batch["text"].to(device=device, dtype=torch.int64, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device=device, dtype=torch.float32, non_blocking=True)
    timers("batch-generator").stop()
    # FLOPs: the transformer runs on L latent positions (Bridge reads the micro-batch size off
    # the tensor's first dimension and the length from config_seq_len).
    accumulate_flops_metadata(state, text, vp_stage=vp_stage, config_seq_len=plan.seq_length)

    output, target_mask, weights = phase1_forward(
        model, text, loss_mask, config, eod_id=eod_id,
        cp_rank=pg_collection.cp.rank(), cp_size=pg_collection.cp.size(),
        forward_context=state.straggler_timer,
    )
    rerun_cfg = state.cfg.rerun_state_machine
    loss_func = partial(
        phase1_loss_func,
        target_mask,
        weights,
        check_for_nan_in_loss=rerun_cfg.check_for_nan_in_loss,
        spiky_loss_factor=getattr(rerun_cfg, "spiky_loss_factor", 10.0) if rerun_cfg.check_for_spiky_loss else None,
    )
    return output, loss_func
