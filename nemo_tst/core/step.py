"""The phase-1 forward of one micro-batch, for any trainer: `phase1_forward`.

Both adapters' forward steps (`nemo_tst.training.step`, `nemo_tst.bridge.step`) read their
batch and pick their loss checks their own way; between the two, phase 1 is the same: cut the
text into bags, take this rank's context-parallel share of the latent positions, switch the
model to superposition and score the next-bag targets.
"""

from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch

from nemo_tst.core.context_parallel import split_for_context_parallel
from nemo_tst.core.loss import phase1_target_weights
from nemo_tst.superposition import SuperpositionConfig, make_superposition_batch, set_superposition

__all__ = ["Phase1Output", "phase1_forward"]


class Phase1Output(NamedTuple):
    """What phase 1's loss function needs: `phase1_loss_terms(target_mask, target_weights,
    per_target_ce)`."""

    per_target_ce: torch.Tensor
    """The model's output: per-target CE [b, L/cp, s] (on the last pipeline stage)."""
    target_mask: torch.Tensor
    """[b, L/cp, s]: which next-bag targets count."""
    target_weights: torch.Tensor
    """[s] float32 on the mask's device, shared by every call (`phase1_target_weights`)."""


def phase1_forward(model, text: torch.Tensor, loss_mask: torch.Tensor, config: SuperpositionConfig, *,
                   eod_id: Optional[int] = None, cp_rank: int = 0, cp_size: int = 1,
                   forward_context=None) -> Phase1Output:
    """Phase 1 on one micro-batch: text [b, s·L + s] (a phase-1 sample, `nemo_tst.core.data`)
    and its loss mask, on the model's device, through a TST model switched to `config`.

    `eod_id`: mask targets across a document end (only with
    `config.mask_cross_document_targets`). `cp_rank`, `cp_size`: this rank's share of the
    latent positions (Megatron's 2·cp zig-zag). `forward_context`: a context manager around the
    model call only (Bridge times it for straggler detection)."""
    batch = make_superposition_batch(text, config, loss_mask=loss_mask, eod_id=eod_id)
    inputs = split_for_context_parallel(
        {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
         "targets": batch.targets, "target_mask": batch.target_mask},
        cp_rank, cp_size,
    )
    set_superposition(model, config)
    with forward_context if forward_context is not None else nullcontext():
        output = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       attention_mask=None, labels=inputs["targets"])
    target_mask = inputs["target_mask"]
    return Phase1Output(output, target_mask, phase1_target_weights(config.weights(), target_mask.device))
