"""Context parallelism over latent positions: Megatron's zig-zag split of the sequence."""

__all__ = ["split_for_context_parallel"]


def split_for_context_parallel(tensors: dict, cp_rank: int, cp_size: int) -> dict:
    """Megatron's zig-zag CP split along dim 1: rank r keeps chunks r and 2*cp-1-r of 2*cp
    (what Megatron-LM's and Bridge's `get_batch_on_this_cp_rank` do to sequences).

    Phase-1 tensors are split along latent positions ([b, L*s] ids, [b, L] positions,
    [b, L, k] targets), so with L % (2*cp) == 0 no bag is cut."""
    import torch

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
