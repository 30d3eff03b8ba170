"""multi_hot_cross_entropy and reduce_multi_hot_loss against plain-PyTorch references."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_tst import multi_hot_cross_entropy, reduce_multi_hot_loss
from tests.distributed import run_on_ranks


def reference_per_target_ce(logits, targets):
    """[L, b, V], [L, b, k] -> [L, b, k]: k separate calls of torch's cross_entropy."""
    V = logits.size(-1)
    flat = logits.float().reshape(-1, V)
    return torch.stack(
        [
            F.cross_entropy(flat, targets[..., j].reshape(-1), reduction="none").view(
                targets.shape[:-1]
            )
            for j in range(targets.size(-1))
        ],
        dim=-1,
    )


def loss_and_grad(fn, logits, targets, upstream):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, targets)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_matches_k_calls_of_torch_cross_entropy(k, dtype, atol):
    gen = torch.Generator().manual_seed(k)
    L, b, V = int(torch.randint(3, 9, (1,), generator=gen)), 2, 37 + k
    logits = (3 * torch.randn(L, b, V, generator=gen)).to(dtype)
    targets = torch.randint(0, V, (L, b, k), generator=gen)
    targets[0, 0, :] = targets[0, 0, 0]  # repeated ids inside one bag must accumulate
    upstream = torch.rand(L, b, k, generator=gen)

    got, got_grad = loss_and_grad(multi_hot_cross_entropy, logits, targets, upstream)
    want, want_grad = loss_and_grad(reference_per_target_ce, logits, targets, upstream)

    assert got.dtype == torch.float32 and got.shape == (L, b, k)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=atol, rtol=0)


def test_uniform_multi_hot_loss_is_the_mean_of_the_k_ces():
    """The paper's phase-1 loss: logsumexp(z) - mean_j z[y_j] = mean_j CE_j."""
    torch.manual_seed(0)
    L, b, V, k = 5, 3, 50, 4
    logits = torch.randn(L, b, V)
    targets = torch.randint(0, V, (L, b, k))
    per_target = multi_hot_cross_entropy(logits, targets)
    total, positions = reduce_multi_hot_loss(per_target, torch.ones(L, b, k), torch.full((k,), 0.25))
    want = torch.logsumexp(logits, -1) - logits.gather(-1, targets).mean(-1)
    torch.testing.assert_close(total, want.sum())
    assert int(positions) == L * b


def test_does_not_mutate_logits():
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 30, requires_grad=True)
    before = logits.detach().clone()
    out = multi_hot_cross_entropy(logits, torch.randint(0, 30, (4, 2, 3)))
    out.sum().backward()
    assert torch.equal(logits.detach(), before)


class _PeakLiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes held by the tensors that ops create while active (each storage once)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not getattr(t, "_tracked", False):
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t.untyped_storage(), self._free, size)
                t._tracked = True
        return out

    def _free(self, size):
        self.live -= size


def test_forward_peak_memory_is_one_fp32_copy_of_the_logits():
    """bf16 logits: the forward holds one fp32 [*, V/tp] tensor at a time (the shifted copy,
    turned into the softmax in place), like one ordinary CE; not an extra upcast copy."""
    L, b, V, k = 8, 2, 8192, 16
    logits = torch.randn(L, b, V).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (L, b, k))
    with _PeakLiveBytes() as tracked:
        multi_hot_cross_entropy(logits, targets, check_targets=False)
    one_fp32_copy = L * b * V * 4
    assert tracked.peak < 1.05 * one_fp32_copy, tracked.peak / one_fp32_copy


def test_saved_for_backward_bytes_do_not_grow_with_k():
    """One fp32 softmax of the shard is saved, whatever k; only the [L, b, k] ids grow."""
    L, b, V = 16, 4, 4096

    def saved_bytes(k):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        logits = torch.randn(L, b, V, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            multi_hot_cross_entropy(logits, torch.randint(0, V, (L, b, k)))
        return total

    one_ce = L * b * V * 4
    small = saved_bytes(1)
    large = saved_bytes(16)
    assert one_ce <= small < 1.05 * one_ce
    # Growth from k=1 to k=16 is only the ids and their shard mask: 15 * L*b*(8 + 1) bytes.
    assert large - small <= 15 * L * b * 9
    assert large < 1.05 * one_ce


@pytest.mark.parametrize("bad", [-1, 40])
def test_targets_outside_the_vocab_raise_before_compute(bad):
    logits = torch.randn(2, 1, 40)
    targets = torch.zeros(2, 1, 3, dtype=torch.long)
    targets[1, 0, 2] = bad
    with pytest.raises(ValueError, match="vocabulary has 40 entries"):
        multi_hot_cross_entropy(logits, targets)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must agree"):
        multi_hot_cross_entropy(torch.randn(3, 2, 10), torch.zeros(3, 1, 2, dtype=torch.long))


def test_reduce_renormalises_weights_over_counted_targets():
    ce = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])  # [1, 3, 3]
    mask = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    w = torch.tensor([0.5, 0.25, 0.25])
    total, positions = reduce_multi_hot_loss(ce, mask, w)
    want = (0.5 * 1 + 0.25 * 2 + 0.25 * 3) + (0.5 * 4 + 0.25 * 6) / 0.75
    torch.testing.assert_close(total, torch.tensor(want))
    assert int(positions) == 2


def _tp2_worker(rank, world_size, k):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(7)
    L, b, V = 6, 3, 64
    logits = 4 * torch.randn(L, b, V, generator=gen)
    targets = torch.randint(0, V, (L, b, k), generator=gen)
    targets[:, 0, 0] = 5  # on rank 0's shard
    targets[:, 1, 0] = V - 3  # on rank 1's shard
    upstream = torch.rand(L, b, k, generator=gen)
    shard = slice(rank * V // world_size, (rank + 1) * V // world_size)

    tp = dist.group.WORLD
    got, got_grad = loss_and_grad(
        lambda x, t: multi_hot_cross_entropy(x, t, tp_group=tp), logits[..., shard], targets, upstream
    )
    want, want_grad = loss_and_grad(reference_per_target_ce, logits, targets, upstream)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_grad, want_grad[..., shard], atol=1e-6, rtol=0)

    if k == 1:  # s=1 is Megatron's own vocab-parallel CE, bit for bit
        megatron, megatron_grad = loss_and_grad(
            lambda x, t: vocab_parallel_cross_entropy(x, t[..., 0], tp_group=tp),
            logits[..., shard],
            targets,
            upstream[..., 0],
        )
        assert torch.equal(got[..., 0], megatron)
        assert torch.equal(got_grad, megatron_grad)


@pytest.mark.parametrize("k", [1, 4])
def test_tensor_parallel_2_matches_full_vocab(k):
    run_on_ranks(_tp2_worker, 2, k)
