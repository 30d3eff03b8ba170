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

from megatron.core import parallel_state, tensor_parallel
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args
from megatron.training.utils import is_first_or_last_pipeline_stage

from nemo_tst.core.context_parallel import split_for_context_parallel
from nemo_tst.core.loss import check_finite_loss, phase1_loss_terms, phase2_loss_terms
from nemo_tst.core.plan import TSTPlan
from nemo_tst.superposition import make_superposition_batch, set_superposition

__all__ = ["ProgressLog", "forward_step", "get_batch", "phase1_loss_func", "phase2_loss_func"]


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
    args = get_args()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, vp_stage)
    config = plan.superposition
    if progress is not None:
        progress(args, model)

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
        weights = torch.tensor(config.weights(), device=inputs["target_mask"].device)
        return output, partial(phase1_loss_func, inputs["target_mask"], weights)

    set_superposition(model, None)
    inputs = _slice_for_context_parallel(
        {k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    )
    output = model(inputs["tokens"], inputs["position_ids"], None, labels=inputs["labels"])
    return output, partial(phase2_loss_func, inputs["loss_mask"])
