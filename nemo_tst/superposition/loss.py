"""The multi-hot cross-entropy of phase 1, vocab-parallel, in one pass.

Latent position i predicts the k tokens of the next bag. With logits z over the vocabulary and
hot ids y_1..y_k, the ordinary cross-entropy against each hot id is

    CE_j = logsumexp(z) - z[y_j]

so all k of them share one logsumexp. The op returns the k per-target CEs; the trainer weighs
them (uniform 1/k is the paper's multi-hot target) in `reduce_multi_hot_loss`. The gradient of
sum_j g_j * CE_j with respect to z is

    (sum_j g_j) * softmax(z) - sum_j g_j * onehot(y_j)

Tensor parallel: each rank holds a [*, V/tp] shard of z. Forward takes three all-reduces over
the TP group (max, sum of exp, the k target logits), backward none. Only the fp32 softmax of
this shard is saved for backward, the same memory as one ordinary CE whatever k is; Megatron's
`vocab_parallel_cross_entropy` called k times would save k softmax copies (and mutate fp32
logits in place, which this op never does).

With k = 1 the op equals `megatron.core.tensor_parallel.vocab_parallel_cross_entropy`.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.tensor_parallel.utils import VocabUtility

__all__ = ["multi_hot_cross_entropy", "reduce_multi_hot_loss"]


def _group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """`None` means a single rank: no collective is issued."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _MultiHotVocabParallelCrossEntropy(torch.autograd.Function):
    """logits [*, V/tp] (any float dtype), targets [*, k] global ids -> CE [*, k] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group):
        rank, world_size = _group_rank_and_size(tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), rank, world_size
        )

        # Shifted fp32 copy of the shard; never written back into `logits`. One fp32 copy at
        # a time: the max of bf16 values is exact, so it is taken before the upcast.
        logits_max = logits.amax(dim=-1).float()
        _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        shifted = logits.to(torch.float32, copy=True)  # [*, V/tp]
        shifted.sub_(logits_max.unsqueeze(-1))

        # The k target logits: gathered where the id lives on this shard, 0 elsewhere, summed
        # over the TP group.
        off_shard = (targets < vocab_start) | (targets >= vocab_end)  # [*, k]
        local_targets = (targets - vocab_start).masked_fill(off_shard, 0)
        target_logits = torch.gather(shifted, -1, local_targets).masked_fill(off_shard, 0.0)
        _all_reduce(target_logits, dist.ReduceOp.SUM, tp_group)

        softmax = shifted.exp_()  # in place on our own copy: [*, V/tp] exp(z - max)
        sum_exp = softmax.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)
        softmax.div_(sum_exp.unsqueeze(-1))

        loss = sum_exp.log().unsqueeze(-1) - target_logits  # [*, k]

        ctx.save_for_backward(softmax, local_targets, off_shard)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, off_shard = ctx.saved_tensors
        grad_loss = grad_loss.float()  # [*, k]
        # In place on the saved softmax (backward runs once, as in Megatron's CE).
        if grad_loss.size(-1) == 1:
            # (softmax - onehot(y)) * g: Megatron's order, so s=1 is bit-identical to it.
            grad = softmax.scatter_add_(-1, local_targets, -(~off_shard).float())
            grad.mul_(grad_loss)
        else:
            # (sum_j g_j) * softmax - sum_j g_j * onehot(y_j) for the ids on this shard;
            # repeated ids accumulate.
            grad = softmax.mul_(grad_loss.sum(dim=-1, keepdim=True))
            grad.scatter_add_(-1, local_targets, -grad_loss.masked_fill(off_shard, 0.0))
        return grad.to(ctx.logits_dtype), None, None


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    *,
    check_targets: bool = True,
) -> torch.Tensor:
    """Per-target cross-entropy of k hot ids against one vocab-parallel distribution.

    Args:
        logits: [L, b, V/tp], this rank's vocabulary shard (Megatron's `parallel_output`
            layout), any float dtype. Not modified.
        targets: [L, b, k] global token ids in [0, V).
        tp_group: the tensor-parallel group the vocabulary is split over; None for one rank.
        check_targets: raise a ValueError for ids outside [0, V) before computing. It reads the
            targets' min and max, one host sync; turn off in hot loops that validated upstream.

    Returns:
        [L, b, k] fp32: CE_j = logsumexp(z) - z[y_j], differentiable w.r.t. `logits`.
    """
    if logits.dim() != targets.dim() or logits.shape[:-1] != targets.shape[:-1]:
        raise ValueError(
            f"multi_hot_cross_entropy: logits {tuple(logits.shape)} ([L, b, V/tp]) and targets "
            f"{tuple(targets.shape)} ([L, b, k]) must agree on every dim but the last"
        )
    if not logits.is_floating_point():
        raise ValueError(f"multi_hot_cross_entropy: logits must be float, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"multi_hot_cross_entropy: targets must hold integer token ids, got {targets.dtype}"
        )
    _, world_size = _group_rank_and_size(tp_group)
    vocab_size = logits.size(-1) * world_size
    if check_targets and targets.numel() > 0:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"multi_hot_cross_entropy: target ids span [{low}, {high}] but the vocabulary "
                f"has {vocab_size} entries ({logits.size(-1)} per rank x tp={world_size}); "
                "mask padded targets with a valid id (e.g. 0) and a zero loss mask, or make the "
                "model's padded vocab size at least the tokenizer's"
            )
    return _MultiHotVocabParallelCrossEntropy.apply(logits, targets.long(), tp_group)


def reduce_multi_hot_loss(
    per_target_loss: torch.Tensor,
    target_mask: torch.Tensor,
    target_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted multi-hot loss summed over latent positions, and the number of positions.

    Args:
        per_target_loss: [..., k] per-target CE from `multi_hot_cross_entropy`.
        target_mask: [..., k], 1 where the target counts (0: past the data, across a document
            boundary when masked, or masked by the dataset).
        target_weights: [k], summing to 1 (uniform 1/k is the paper's multi-hot target).

    Returns:
        (loss_sum, num_positions): loss_sum = sum over positions of
        sum_j w_j m_j CE_j / sum_j w_j m_j (the weights renormalised over the targets that
        count, so a position with all targets counting gets exactly sum_j w_j CE_j);
        num_positions counts positions with at least one target. Megatron's schedule divides
        the first by the second. Counting latent positions, not targets, keeps the MoE router's
        aux-loss scaling right: the router sees one token per latent position.
    """
    weighted_mask = target_mask.float() * target_weights  # [..., k]
    position_weight = weighted_mask.sum(-1)  # [...]
    has_target = position_weight > 0
    position_loss = (per_target_loss.float() * weighted_mask).sum(-1) / torch.where(
        has_target, position_weight, torch.ones_like(position_weight)
    )
    return position_loss.sum(), has_target.sum()
