"""Tokens -> bags: the phase-1 model input and its next-bag targets.

A phase-1 sample is a contiguous run of text tokens t_0 .. t_{n-1} (Megatron's `tokens` plus
the last `labels` token). With s_in tokens averaged per latent position (s_in = s, or 1 for
the output-only ablation) and k targets per position (k = s, or 1 for input-only):

    input ids    t_0 .. t_{L*s_in - 1}                    -> L latent positions
    bag i        t_{i*s_in} .. t_{(i+1)*s_in - 1}
    targets[i,j] t_{(i+1)*s_in + j},  j = 0..k-1           -> n = L*s_in + k tokens in all

With s = 1 this is Megatron's ordinary (tokens, labels) pair. For "full" TST, position i
predicts bag i+1; for output-only, token i predicts t_{i+1} .. t_{i+s}.

Documents. Megatron packs documents into samples separated by an end-of-document (EOD) token
and, by default, trains across the boundary. A bag may therefore hold the end of one document
and the start of the next: its mean embedding mixes both, and that is kept (cutting bags at
boundaries would change L per sample and break equal FLOPs). For targets the choice is
`SuperpositionConfig.mask_cross_document_targets`: off (default) keeps them, like ordinary
packed training; on masks target j of position i when an EOD lies in t_{(i+1)*s_in - 1} ..
t_{target - 1}, i.e. the target starts a later document than the bag's last token. Predicting
the EOD itself stays a target, as in ordinary training.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_tst.superposition.config import SuperpositionConfig

__all__ = ["SuperpositionBatch", "make_superposition_batch", "num_latent_positions"]


@dataclass
class SuperpositionBatch:
    input_ids: torch.Tensor
    """[b, L*s_in] token ids the embedding averages in bags of s_in."""
    position_ids: torch.Tensor
    """[b, L] latent positions 0..L-1 (learned absolute positions are per latent position)."""
    targets: torch.Tensor
    """[b, L, k] global token ids each latent position predicts."""
    target_mask: torch.Tensor
    """[b, L, k] float, 1 where the target counts in the loss."""


def num_latent_positions(config: SuperpositionConfig, text_length: int) -> int:
    """L for a sample of `text_length` tokens; raises unless it splits exactly into bags."""
    s_in, k = config.input_bag_size, config.num_targets
    L, rest = divmod(text_length - k, s_in)
    if L < 1 or rest:
        raise ValueError(
            f"a phase-1 sample of {text_length} tokens does not split into bags: with "
            f"bag_size={config.bag_size} (mode={config.mode!r}) it must hold L*{s_in} + {k} "
            f"tokens for a whole number L >= 1 of latent positions; build the dataset with "
            f"sequence length L*{s_in} + {k - 1} (L = the model's --seq-length)"
        )
    return L


def target_positions(config: SuperpositionConfig, L: int, device=None) -> torch.Tensor:
    """[L, k] index into the text of each latent position's targets: (i+1)*s_in + j."""
    s_in, k = config.input_bag_size, config.num_targets
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(k, device=device).unsqueeze(0)
    return (i + 1) * s_in + j


def cross_document_mask(
    text: torch.Tensor, positions: torch.Tensor, s_in: int, eod_id: int
) -> torch.Tensor:
    """[b, L, k] bool: True where an EOD lies between the bag's last input token and the target.

    text [b, n]; positions [L, k] target indices. EOD counts by prefix sums: the number of EODs
    in text[a .. c] is cum[c + 1] - cum[a].
    """
    is_eod = (text == eod_id).long()
    cum = torch.nn.functional.pad(is_eod.cumsum(dim=1), (1, 0))  # [b, n+1], cum[p] = #EOD < p
    L = positions.size(0)
    last_input = (torch.arange(L, device=text.device) + 1) * s_in - 1  # [L]
    eods_before_target = cum[:, positions]  # [b, L, k]  #EOD in t_0 .. t_{target-1}
    eods_before_last_input = cum[:, last_input].unsqueeze(-1)  # [b, L, 1]
    return eods_before_target > eods_before_last_input


def make_superposition_batch(
    text: torch.Tensor,
    config: SuperpositionConfig,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    eod_id: Optional[int] = None,
) -> SuperpositionBatch:
    """Cut a batch of text into phase-1 inputs and next-bag targets.

    Args:
        text: [b, n] token ids, n = L*s_in + k (`SuperpositionConfig.sample_length(L)`).
        config: the phase-1 settings.
        loss_mask: optional [b, n-1] float mask of Megatron's layout, aligned with the labels
            t_1 .. t_{n-1}; each target takes the mask of the token it predicts.
        eod_id: the end-of-document id; required when `mask_cross_document_targets` is set.
    """
    if text.dim() != 2:
        raise ValueError(f"text must be [batch, tokens], got shape {tuple(text.shape)}")
    b, n = text.shape
    L = num_latent_positions(config, n)
    s_in = config.input_bag_size

    positions = target_positions(config, L, device=text.device)  # [L, k]
    targets = text[:, positions]  # [b, L, k]

    if loss_mask is None:
        target_mask = torch.ones(targets.shape, dtype=torch.float32, device=text.device)
    else:
        if loss_mask.shape != (b, n - 1):
            raise ValueError(
                f"loss_mask must be [batch, tokens - 1] = {(b, n - 1)} (aligned with the "
                f"labels), got {tuple(loss_mask.shape)}"
            )
        target_mask = loss_mask[:, positions - 1].float()

    if config.mask_cross_document_targets:
        if eod_id is None:
            raise ValueError(
                "mask_cross_document_targets needs the tokenizer's end-of-document id (eod_id)"
            )
        target_mask = target_mask.masked_fill(
            cross_document_mask(text, positions, s_in, eod_id), 0.0
        )

    position_ids = torch.arange(L, device=text.device).unsqueeze(0).expand(b, L)
    return SuperpositionBatch(
        input_ids=text[:, : L * s_in],
        position_ids=position_ids,
        targets=targets,
        target_mask=target_mask,
    )
