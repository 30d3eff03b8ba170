"""forward_step and loss functions for Megatron-LM's trainer, both phases.

The phase of a micro-batch is read off the batch itself (phase-1 samples carry "text", see
`nemo_tst.training.data`), so the same forward_step serves phase 1, phase 2 and validation
(always ordinary next-token data) and a resumed run needs no extra state. Pipeline stages
without data (neither first nor last) never look at the phase: both phases run the transformer
on L positions, so their activations have the same shape.

Loss accounting matches Megatron's pretrain_gpt: loss_func returns (sum, count, report) and the
schedule divides by the count. Phase 1 counts latent positions (see `reduce_multi_hot_loss`),
so the MoE router's aux-loss scaling, which assumes one router token per counted token, holds.
"""

from functools import partial
from typing import Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args
from megatron.training.utils import is_first_or_last_pipeline_stage

from nemo_tst.training import faults
from nemo_tst.training.arguments import TSTPlan
from nemo_tst.superposition import (
    make_superposition_batch,
    reduce_multi_hot_loss,
    set_superposition,
)

__all__ = ["forward_step", "phase1_loss_func", "phase2_loss_func", "get_batch"]


def _broadcast_over_tp(batch: dict | None) -> dict:
    """TP rank 0 read the batch; every TP rank gets the same tensors (shapes included)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group.size() == 1:
        return batch
    # Rank 0 tells the others which phase (hence which keys) this micro-batch is.
    is_phase1 = torch.tensor([int(batch is not None and "text" in batch)], dtype=torch.int64)
    src = torch.distributed.get_process_group_ranks(tp_group)[0]
    torch.distributed.broadcast(is_phase1, src, group=tp_group)
    int_keys = ["text"] if is_phase1.item() else ["tokens", "labels", "position_ids"]
    out = tensor_parallel.broadcast_data(int_keys, batch, torch.int64, tp_group=tp_group)
    out.update(tensor_parallel.broadcast_data(["loss_mask"], batch, torch.float32, tp_group=tp_group))
    return out


def get_batch(data_iterator, vp_stage=None):
    """The micro-batch on this rank, or None on stages that take no data."""
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = next(data_iterator) if tp_rank == 0 and data_iterator is not None else None
    if batch is not None:
        batch = {k: v.to(torch.int64) if k != "loss_mask" else v.float() for k, v in batch.items()}
        if torch.cuda.is_available():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return _broadcast_over_tp(batch)


def split_for_context_parallel(tensors: dict, cp_rank: int, cp_size: int) -> dict:
    """Megatron's zig-zag CP split along dim 1: rank r keeps chunks r and 2*cp-1-r of 2*cp.

    Phase-1 tensors are split along latent positions ([b, L*s] ids, [b, L] positions,
    [b, L, k] targets), so with L % (2*cp) == 0 no bag is cut."""
    if cp_size == 1:
        return dict(tensors)
    out = {}
    for key, t in tensors.items():
        if t.size(1) % (2 * cp_size):
            raise ValueError(f"{key} has {t.size(1)} entries along the sequence, not divisible "
                             f"by 2 x context_parallel_size = {2 * cp_size}")
        chunks = t.chunk(2 * cp_size, dim=1)
        out[key] = torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=1)
    return out


def _slice_for_context_parallel(tensors: dict) -> dict:
    return split_for_context_parallel(tensors, parallel_state.get_context_parallel_rank(),
                                      parallel_state.get_context_parallel_world_size())


def _check_finite(loss, phase: int) -> None:
    """Megatron's own NaN/Inf check (as pretrain_gpt does), naming the phase; it raises with
    the iteration, before the optimizer step, so the last checkpoint stays the last good one."""
    if not get_args().check_for_nan_in_loss_and_grad:
        return
    get_rerun_state_machine().validate_result(
        result=loss,
        rejection_func=lambda x: not torch.isfinite(x).all(),
        message=f"non-finite TST phase-{phase} loss at iteration {get_args().curr_iteration + 1}; "
        "lower the LR or check the data, then rerun the same command to resume from the last "
        "checkpoint",
        tolerance=0.0,
        fatal=True,
    )


def phase1_loss_terms(target_mask, target_weights, output_tensor):
    """The phase-1 loss in the trainer's contract, (loss sum, count, report), without checks.

    output_tensor: per-target CE [b, L, k]; target_mask [b, L, k]; target_weights [k]. The
    count is latent positions with a target (the schedule divides by it; the MoE aux loss
    assumes one counted token per router token). Report entries are [sum, count] pairs, summed
    over micro-batches and DP ranks: "tst loss" and, for k > 1, "tst loss t+j", how well each
    next-bag token is predicted. Shared by Megatron-LM's trainer and the Bridge adapter."""
    loss_sum, positions = reduce_multi_hot_loss(output_tensor, target_mask, target_weights)
    report = {"tst loss": torch.stack([loss_sum.detach().float(), positions.float()])}
    if output_tensor.size(-1) > 1:
        mask = target_mask.float()
        per_offset = (output_tensor.detach().float() * mask).sum(dim=(0, 1))
        counts = mask.sum(dim=(0, 1))
        for j in range(output_tensor.size(-1)):
            report[f"tst loss t+{j + 1}"] = torch.stack([per_offset[j], counts[j]])
    return loss_sum, positions.to(torch.int), report


def phase1_loss_func(target_mask, target_weights, output_tensor):
    """`phase1_loss_terms` with Megatron's non-finite check naming the phase."""
    loss_sum, positions, report = phase1_loss_terms(target_mask, target_weights, output_tensor)
    _check_finite(loss_sum, 1)
    return loss_sum, positions, report


def phase2_loss_func(loss_mask, output_tensor):
    """Megatron pretrain_gpt's loss: output_tensor per-token CE [b, L]."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    _check_finite(loss, 2)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}


_last_logged_iteration = -1


def _log_progress(args, plan: TSTPlan, model) -> None:
    """One line per --log-interval from the rank that logs losses: phase, s, L, text tokens."""
    global _last_logged_iteration
    iteration = getattr(args, "curr_iteration", None)
    if (
        iteration is None
        or not model.training
        or iteration == _last_logged_iteration
        or (iteration + 1) % args.log_interval
        or torch.distributed.get_rank() != torch.distributed.get_world_size() - 1
    ):
        return
    _last_logged_iteration = iteration
    phase = plan.phase_of_iteration(iteration)
    s = plan.superposition.bag_size if phase == 1 else 1
    print(
        f"[tst] iteration {iteration + 1} | phase {phase} | s {s} | latent positions "
        f"{plan.seq_length} | text tokens {plan.text_tokens_after(iteration + 1)}",
        flush=True,
    )


def forward_step(data_iterator, model, *, plan: TSTPlan, eod_id: Optional[int]):
    """Megatron forward_step: (output, loss_func) for either phase.

    Bind `plan` and `eod_id` with functools.partial; they stay out of Megatron's args because
    those are pickled into every checkpoint, which must load without nemo_tst installed.
    """
    args = get_args()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    if model.training and getattr(args, "curr_iteration", None) is not None:
        faults.maybe_kill(args.curr_iteration + 1)
    batch = get_batch(data_iterator, vp_stage)
    config = plan.superposition
    _log_progress(args, plan, model)

    phase1 = batch is not None and "text" in batch
    if batch is None:
        # Middle pipeline stage: the phase only matters where ids are embedded or scored.
        output = model(None, None, None)
        return output, partial(phase2_loss_func, None)

    if phase1:
        set_superposition(model, config)
        tst = make_superposition_batch(
            batch["text"], config, loss_mask=batch["loss_mask"], eod_id=eod_id
        )
        inputs = _slice_for_context_parallel(
            {"input_ids": tst.input_ids, "position_ids": tst.position_ids,
             "targets": tst.targets, "target_mask": tst.target_mask}
        )
        output = model(inputs["input_ids"], inputs["position_ids"], None, labels=inputs["targets"])
        output = faults.maybe_poison(output, args.curr_iteration + 1) if model.training else output
        weights = torch.tensor(config.weights(), device=inputs["target_mask"].device)
        return output, partial(phase1_loss_func, inputs["target_mask"], weights)

    set_superposition(model, None)
    inputs = _slice_for_context_parallel(
        {k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    )
    output = model(inputs["tokens"], inputs["position_ids"], None, labels=inputs["labels"])
    output = faults.maybe_poison(output, args.curr_iteration + 1) if model.training else output
    return output, partial(phase2_loss_func, inputs["loss_mask"])
