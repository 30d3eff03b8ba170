"""Both phases' losses in the trainers' loss-function contract, and the one non-finite check.

Megatron-LM's trainer and Megatron-Bridge take the same contract from a loss function:
(loss sum, count, report), where the schedule divides the sum by the count summed over
micro-batches and data-parallel ranks, and each report entry is a [sum, count] pair.
"""

import functools
from typing import Optional

import torch

from nemo_tst.superposition import reduce_multi_hot_loss

__all__ = ["check_finite_loss", "phase1_loss_terms", "phase1_target_weights", "phase2_loss_terms"]


@functools.lru_cache(maxsize=16)
def _target_weights(weights: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(weights, dtype=torch.float32, device=device)


def phase1_target_weights(weights, device) -> torch.Tensor:
    """The k target weights as a float32 [k] tensor on `device`, one tensor per (weights,
    device): forward steps ask for it every micro-batch, and making it anew on a GPU is a
    host-to-device copy each time. Read-only: every caller shares it."""
    return _target_weights(tuple(float(w) for w in weights), torch.device(device))


def phase1_loss_terms(target_mask, target_weights, output_tensor):
    """The phase-1 (multi-hot) loss as (loss sum, count, report), without checks.

    output_tensor: per-target CE [b, L, k]; target_mask [b, L, k]; target_weights [k]. The
    count is latent positions with a target (the schedule divides by it; the MoE aux loss
    assumes one counted token per router token). Report: "tst loss" and, for k > 1,
    "tst loss t+j", how well each next-bag token is predicted."""
    loss_sum, positions = reduce_multi_hot_loss(output_tensor, target_mask, target_weights)
    report = {"tst loss": torch.stack([loss_sum.detach().float(), positions.float()])}
    if output_tensor.size(-1) > 1:
        mask = target_mask.float()
        per_offset = (output_tensor.detach().float() * mask).sum(dim=(0, 1))
        counts = mask.sum(dim=(0, 1))
        for j in range(output_tensor.size(-1)):
            report[f"tst loss t+{j + 1}"] = torch.stack([per_offset[j], counts[j]])
    return loss_sum, positions.to(torch.int), report


def phase2_loss_terms(loss_mask, output_tensor):
    """Megatron pretrain_gpt's next-token loss as (loss sum, token count, report):
    output_tensor is the per-token CE [b, L]."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}


def check_finite_loss(loss, *, what: str, fix: str = "", spiky_loss_factor: Optional[float] = None) -> None:
    """Megatron's rerun state machine on a loss, the check both trainers make on their own
    losses: a NaN or Inf is fatal and reported before the optimizer step (so the last
    checkpoint stays the last good one); with `spiky_loss_factor`, an unexpectedly large loss
    is reported too (not fatal). The report says "non-finite <what>; <fix>"."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    rerun = get_rerun_state_machine()
    rerun.validate_result(
        result=loss,
        rejection_func=lambda x: not torch.isfinite(x).all(),
        message=f"non-finite {what}" + (f"; {fix}" if fix else ""),
        tolerance=0.0,
        fatal=True,
    )
    if spiky_loss_factor is not None:
        rerun.validate_result(
            result=loss,
            rejection_func=lambda x: rerun.is_unexpectedly_large(x, threshold=spiky_loss_factor, context=what),
            message=f"spiky {what}",
            tolerance=0.0,
            fatal=False,
        )
