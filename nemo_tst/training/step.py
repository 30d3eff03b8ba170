"""forward_step and loss functions for Megatron-LM's trainer, both phases.

The phase of a micro-batch is read off the batch itself (phase-1 samples carry "text", see
`nemo_tst.core.data`), so the same forward_step serves phase 1, phase 2 and validation
(always ordinary next-token data) and a resumed run needs no extra state. Pipeline stages
without data (neither first nor last) never look at the phase: both phases run the transformer
on L positions, so their activations have the same shape.

Loss accounting matches Megatron's pretrain_gpt: loss_func returns (sum, count, report) and the
schedule divides by the count (`nemo_tst.core.loss`). Phase 1 counts latent positions, so the
MoE router's aux-loss scaling, which assumes one router token per counted token, holds.
"""

from functools import partial
from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args
from megatron.training.utils import is_first_or_last_pipeline_stage

from nemo_tst.core.context_parallel import split_for_context_parallel
from nemo_tst.core.data import batch_device
from nemo_tst.core.loss import check_finite_loss, phase1_loss_terms, phase2_loss_terms
from nemo_tst.core.plan import TSTPlan
from nemo_tst.core.step import phase1_forward
from nemo_tst.superposition import set_superposition

__all__ = ["ProgressLog", "forward_step", "get_batch", "phase1_loss_func", "phase2_loss_func"]


def _broadcast_over_tp(batch: dict | None, device: torch.device) -> dict:
    """TP rank 0 read the batch; every TP rank gets the same tensors on `device` (NCCL, the
    backend of Megatron's TP group on GPUs, takes only tensors on the rank's own device)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group.size() == 1:
        return batch
    src = torch.distributed.get_process_group_ranks(tp_group)[0]
    # Rank 0 tells the others the phase (hence the keys) and the shapes: every id tensor is
    # [b, n], the loss mask [b, m] (phase 1's text holds one token more than its loss mask).
    if tp_group.rank() == 0:
        phase1 = "text" in batch
        b, n = batch[_int_keys(phase1)[0]].shape
        header = torch.tensor([int(phase1), b, n, batch["loss_mask"].size(1)], dtype=torch.int64,
                              device=device)
    else:
        header = torch.empty(4, dtype=torch.int64, device=device)
    torch.distributed.broadcast(header, src, group=tp_group)
    if tp_group.rank() != 0:
        phase1, b, n, m = header.tolist()
        batch = {key: torch.empty(b, n, dtype=torch.int64, device=device) for key in _int_keys(phase1)}
        batch["loss_mask"] = torch.empty(b, m, dtype=torch.float32, device=device)
    for key in (*_int_keys(phase1), "loss_mask"):
        torch.distributed.broadcast(batch[key], src, group=tp_group)
    return batch


def _int_keys(phase1: bool) -> tuple[str, ...]:
    return ("text",) if phase1 else ("tokens", "labels", "position_ids")


def get_batch(data_iterator, model):
    """The micro-batch on this rank, on the device of the model (chunk) it feeds, or None on
    stages that take no data."""
    if not is_first_or_last_pipeline_stage(get_attr_wrapped_model(model, "vp_stage")):
        return None
    device = batch_device(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = next(data_iterator) if tp_rank == 0 and data_iterator is not None else None
    if batch is not None:
        batch = {
            k: v.to(device=device, dtype=torch.float32 if k == "loss_mask" else torch.int64,
                    non_blocking=True)
            for k, v in batch.items()
        }
    return _broadcast_over_tp(batch, device)


def _slice_for_context_parallel(tensors: dict) -> dict:
    return split_for_context_parallel(tensors, parallel_state.get_context_parallel_rank(),
                                      parallel_state.get_context_parallel_world_size())


def _check_finite(loss, phase: int) -> None:
    """The one non-finite check (`check_finite_loss`), naming the phase and the iteration."""
    args = get_args()
    if args.check_for_nan_in_loss_and_grad:
        check_finite_loss(
            loss, what=f"TST phase-{phase} loss at iteration {args.curr_iteration + 1}",
            fix="lower the LR or check the data, then rerun the same command to resume from the "
                "last checkpoint",
        )


def phase1_loss_func(target_mask, target_weights, output_tensor):
    """Phase 1's loss (`phase1_loss_terms`) with the non-finite check naming the phase."""
    loss_sum, positions, report = phase1_loss_terms(target_mask, target_weights, output_tensor)
    _check_finite(loss_sum, 1)
    return loss_sum, positions, report


def phase2_loss_func(loss_mask, output_tensor):
    """Megatron pretrain_gpt's loss (`phase2_loss_terms`) with the same check."""
    loss, num_tokens, report = phase2_loss_terms(loss_mask, output_tensor)
    _check_finite(loss, 2)
    return loss, num_tokens, report


class ProgressLog:
    """One line per --log-interval from the rank that logs losses: phase, s, L, text tokens.

    forward_step runs once per micro-batch; the line is printed for the first micro-batch of
    an iteration only. One per training process, bound into forward_step by the entry point."""

    def __init__(self, plan: TSTPlan):
        self.plan = plan
        self.last_iteration = -1

    def __call__(self, args, model) -> None:
        iteration = getattr(args, "curr_iteration", None)
        if (
            iteration is None
            or not model.training
            or iteration == self.last_iteration
            or (iteration + 1) % args.log_interval
            or torch.distributed.get_rank() != torch.distributed.get_world_size() - 1
        ):
            return
        self.last_iteration = iteration
        plan = self.plan
        phase = plan.phase_of_iteration(iteration)
        s = plan.superposition.bag_size if phase == 1 else 1
        print(
            f"[tst] iteration {iteration + 1} | phase {phase} | s {s} | latent positions "
            f"{plan.seq_length} | text tokens {plan.text_tokens_after(iteration + 1)}",
            flush=True,
        )


def forward_step(data_iterator, model, *, plan: TSTPlan, eod_id: Optional[int],
                 progress: Optional[ProgressLog] = None):
    """Megatron forward_step: (output, loss_func) for either phase.

    Bind `plan`, `eod_id` and `progress` with functools.partial; they stay out of Megatron's
    args because those are pickled into every checkpoint, which must load without nemo_tst.
    """
    batch = get_batch(data_iterator, model)
    config = plan.superposition
    if progress is not None:
        progress(get_args(), model)

    phase1 = batch is not None and "text" in batch
    if batch is None:
        # Middle pipeline stage: the phase only matters where ids are embedded or scored.
        output = model(None, None, None)
        return output, partial(phase2_loss_func, None)

    if phase1:
        output, target_mask, weights = phase1_forward(
            model, batch["text"], batch["loss_mask"], config, eod_id=eod_id,
            cp_rank=parallel_state.get_context_parallel_rank(),
            cp_size=parallel_state.get_context_parallel_world_size(),
        )
        return output, partial(phase1_loss_func, target_mask, weights)

    set_superposition(model, None)
    inputs = _slice_for_context_parallel(
        {k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    )
    output = model(inputs["tokens"], inputs["position_ids"], None, labels=inputs["labels"])
    return output, partial(phase2_loss_func, inputs["loss_mask"])
