"""benchmarks/loss_microbench.py: its naive Megatron baseline on fp32 logits runs backward.

Megatron's vocab_parallel_cross_entropy works in place on fp32 logits, so the s calls of the
naive multi-hot baseline once shared (and destroyed) one tensor: the second call failed in
backward. Each call now gets its own copy; the loss and gradient must match s calls of torch's
cross_entropy, and the logits must stay untouched across repeated passes.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def microbench():
    return load_benchmark("loss_microbench")


def reference(logits, targets):
    V, s = logits.size(-1), targets.size(-1)
    flat = logits.reshape(-1, V)
    return sum(F.cross_entropy(flat, targets[..., j].reshape(-1)) for j in range(s)) / s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_megatron_baseline_backward(single_rank, microbench, dtype):
    from megatron.core import parallel_state

    cases_one, cases_s = microbench.loss_cases(parallel_state.get_tensor_model_parallel_group())
    gen = torch.Generator().manual_seed(0)
    L, b, V, s = 5, 2, 33, 3
    logits = (3 * torch.randn(L, b, V, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (L, b, s), generator=gen)
    before = logits.detach().clone()

    for name, targets_scored in (("naive s x CE (Megatron)", targets), ("one CE (Megatron)", targets[..., :1])):
        x = before.float().clone().requires_grad_()  # .float() of fp32 is `before` itself
        want = reference(x, targets_scored)
        want.backward()
        fn = cases_s.get(name) or cases_one[name]
        for _ in range(2):  # the benchmark calls each case many times on the same logits
            logits.grad = None
            loss = fn(logits, targets)
            loss.backward()
            assert torch.equal(logits.detach(), before), f"{name} modified the logits"
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss.float(), want.detach(), atol=atol, rtol=0, msg=name)
        torch.testing.assert_close(logits.grad.float(), x.grad, atol=atol, rtol=0, msg=name)
