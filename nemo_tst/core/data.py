"""Phase-aware training data over one token stream, on Megatron's GPTDataset.

Both phases read the same stream of *items*: windows of `pieces * (L + 1)` text tokens that
Megatron's `GPTDataset` cuts (documents packed, shuffled per epoch, blended across corpora,
index cached: all of that is Megatron's). `pieces = ceil(sample_length / (L + 1))` (= s for
full TST), so one phase-1 sample and `pieces` phase-2 samples cover the same window.

Phase 1 (samples j < P1, P1 = n1 * global batch): sample j is item j, its first
sample_length tokens (s*L + s for full TST: exactly one item).

Phase 2 reads the M = ceil(phase-2 samples / pieces) items after phase 1's in `pieces`
passes: pass c reads piece c (L + 1 tokens) of every one of the M items, in item order.

    q = j - P1 (phase-2 sample),  pass, k = divmod(q, M):  item P1 + k, piece = pass

Why passes, and not an item's pieces side by side: Megatron's sampler forms each global
batch of B samples from B consecutive sample indices. Read piece by piece (item P1 + q //
pieces, piece q % pieces), a global batch would hold only B / s items, each cut into s
adjacent windows of the same text: fewer independent windows per batch than the baseline's
B, noisier gradients for the whole recovery phase. With passes, every phase-2 global batch
holds B distinct items (as long as M >= B) and consecutive batches hold other items too, as
in the baseline, whose batches are B random windows each. Interleaving only within blocks of
B items (each item's pieces read on s consecutive steps) also gives B distinct items per
batch, but consecutive batches then read adjacent text of the same documents, and a final
short block repeats items within a batch. Measured through the trainer on the CPU demo's
model (s = 4, 3,000 steps, docs/benchmarks.md): final held-out loss 3.746 with passes, 3.921
with blocks of B, 3.933 side by side, 3.705 for the baseline. Items past the plan's M
(GPTDataset indexes whole epochs) are read piece by piece after the passes; the plan never
asks for them.

The phase and the text of sample j are a function of j and the plan alone, and Megatron's
sampler resumes at `consumed_train_samples`: a resumed run, in either phase, reads exactly
the samples the uninterrupted run would have. With s = 1 (pieces = 1) phase 2's sample j is
item j: the mapping is the identity, and a baseline reads what plain Megatron reads.

Guarantee: within one epoch of the corpus no text token is an input twice, across both
phases: items are disjoint windows (their last token is shared with the next item only as a
target), phase 2 starts at the first item phase 1 did not read, and each (item, piece) is
read once. When the plan needs more items than one epoch holds, Megatron starts a new
shuffled epoch (tokens repeat); `corpus_shortfall` says so before launch.

Validation is ordinary next-token data (GPTDataset at sequence length L) in both phases, so
the curves of TST and baseline runs compare directly.
"""

import math
from typing import Optional

import numpy as np
import torch

from nemo_tst.core.plan import TSTPlan

__all__ = [
    "TSTTrainDataset", "batch_device", "corpus_shortfall", "item_sequence_length", "items_needed",
    "phase2_item_and_piece", "pieces_per_item",
]


def batch_device(model) -> torch.device:
    """Where a rank's micro-batch lives: with the model's parameters, the device its collectives
    run on (NCCL takes only tensors there). TP ranks that read no data allocate their copy of
    the batch there too."""
    return next(model.parameters()).device


def pieces_per_item(plan: TSTPlan) -> int:
    """Phase-2 samples (L + 1 tokens each) per item; an item also holds one phase-1 sample."""
    return math.ceil(plan.superposition.sample_length(plan.seq_length) / (plan.seq_length + 1))


def item_sequence_length(plan: TSTPlan) -> int:
    """GPTDataset's `sequence_length` for items: it returns that many tokens plus one."""
    return pieces_per_item(plan) * (plan.seq_length + 1) - 1


def phase2_items(plan: TSTPlan) -> int:
    """M: the items phase 2 reads, `pieces` samples each."""
    return math.ceil(plan.phase2_iters * plan.global_batch_size / pieces_per_item(plan))


def items_needed(plan: TSTPlan) -> int:
    """Items the whole plan reads (both phases)."""
    return plan.phase1_samples + phase2_items(plan)


def phase2_item_and_piece(q: int, plan: TSTPlan) -> tuple[int, int]:
    """(item, piece) of phase-2 sample q (= j - P1), the item counted from phase 2's first.

    The first M * pieces samples are `pieces` passes over the M items of the plan (pass c
    reads piece c of each); samples after those read the remaining items piece by piece."""
    pieces, M = pieces_per_item(plan), phase2_items(plan)
    if q < M * pieces:
        piece, item = divmod(q, M)
        return item, piece
    item, piece = divmod(q - M * pieces, pieces)
    return M + item, piece


def corpus_shortfall(plan: TSTPlan, corpus_tokens: int) -> Optional[str]:
    """Why the plan reads more text than one epoch of the corpus holds, or None if it fits.
    (The caller warns, or refuses when its user asked for strict data.)"""
    needed = items_needed(plan) * (item_sequence_length(plan) + 1)
    if needed <= corpus_tokens:
        return None
    return (
        f"the TST plan reads {needed:,} text tokens but the training corpus holds "
        f"{corpus_tokens:,}: Megatron will start a new epoch and tokens will repeat (the "
        "paper's data-bound regime, where TST loses to the baseline). Add data, or lower the "
        "iterations or the bag size"
    )


class TSTTrainDataset(torch.utils.data.Dataset):
    """Training samples of both phases over a dataset of items (see module docstring).

    `items[i]` must be a GPTDataset-style dict with "tokens" and "labels" of
    `item_sequence_length(plan)` tokens and a "loss_mask" aligned with the labels.

    Phase-1 samples: {"text": [sample_length], "loss_mask": [sample_length - 1]}.
    Phase-2 samples: Megatron's {"tokens", "labels", "loss_mask", "position_ids"} of length L.
    """

    def __init__(self, items, plan: TSTPlan):
        self.items = items
        self.plan = plan
        self.pieces = pieces_per_item(plan)
        self.sample_length = plan.superposition.sample_length(plan.seq_length)
        if len(items) < plan.phase1_samples:
            raise ValueError(
                f"{len(items)} items cannot hold the {plan.phase1_samples} phase-1 samples"
            )

    def __len__(self) -> int:
        P1 = self.plan.phase1_samples
        return P1 + (len(self.items) - P1) * self.pieces

    def _item_text(self, index: int):
        item = self.items[index]
        tokens, labels = np.asarray(item["tokens"]), np.asarray(item["labels"])
        text = np.concatenate([tokens, labels[-1:]])  # the item's pieces*(L+1) tokens
        return text.astype(np.int64), np.asarray(item["loss_mask"], dtype=np.float32)

    def __getitem__(self, j: int) -> dict:
        P1, L = self.plan.phase1_samples, self.plan.seq_length
        if j < P1:
            text, loss_mask = self._item_text(j)
            n = self.sample_length
            return {"text": torch.from_numpy(text[:n]), "loss_mask": torch.from_numpy(loss_mask[: n - 1])}
        item, piece = phase2_item_and_piece(j - P1, self.plan)
        text, loss_mask = self._item_text(P1 + item)
        start = piece * (L + 1)
        window = text[start : start + L + 1]
        return {
            "tokens": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(window[1:].copy()),
            # loss_mask[p] is the mask of predicting text[p + 1]
            "loss_mask": torch.from_numpy(loss_mask[start : start + L].copy()),
            "position_ids": torch.arange(L, dtype=torch.int64, device="cpu"),  # a host sample
        }
