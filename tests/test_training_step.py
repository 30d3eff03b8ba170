"""The trainer's forward step on the device it will run on: every tensor it hands to a
collective is on the batch's device, and the phase-1 target weights are made once.

On GPUs Megatron's tensor-parallel group is NCCL, which refuses a tensor on any device but the
rank's own; gloo, the CPU backend, takes any CPU tensor. To see on a CPU-only machine what NCCL
would refuse, the model here lives on the `meta` device: a tensor our code makes on the CPU by
mistake shows up as cpu next to meta.
"""

import ast
from pathlib import Path

import pytest
import torch

from tests.test_model import BATCH, L, VOCAB, build

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_tst"


def make_plan(s=4):
    from nemo_tst.core.plan import TSTPlan
    from nemo_tst.core.settings import TSTSettings

    return TSTPlan(settings=TSTSettings(bag_size=s), seq_length=L, global_batch_size=BATCH,
                   train_iters=10, phase1_iters=3)


def phase1_sample(plan, seed=0):
    """A phase-1 micro-batch as the data loader yields it (host tensors, see core/data.py)."""
    n = plan.superposition.sample_length(plan.seq_length)
    text = torch.randint(0, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(seed))
    return {"text": text, "loss_mask": torch.ones(BATCH, n - 1)}


def phase2_sample(plan, seed=0):
    ids = torch.randint(0, VOCAB, (BATCH, plan.seq_length + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(BATCH, plan.seq_length),
            "position_ids": torch.arange(plan.seq_length).expand(BATCH, -1)}


class TensorParallelPair:
    """Megatron's TP group as this rank sees it, for a world of two ranks: its size and rank."""

    def __init__(self, rank):
        self._rank = rank

    def size(self):
        return 2

    def rank(self):
        return self._rank


class MetaHoldsNoData(Exception):
    """A receiving rank cannot read what a broadcast into a meta tensor carried: stop there."""


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("tp_rank", [0, 1])
def test_collectives_get_tensors_on_the_batch_device(single_rank, monkeypatch, tp_rank, phase):
    """get_batch over a TP group of two: every tensor handed to torch.distributed, and the batch
    it returns, is on the model's device. Rank 0 reads the data loader's host tensors; rank 1
    has no batch and allocates its copy."""
    from megatron.core import parallel_state

    from nemo_tst.training.step import get_batch

    with torch.device("meta"):
        model = build()
    assert next(model.parameters()).device.type == "meta"
    plan = make_plan()
    sample = (phase1_sample if phase == 1 else phase2_sample)(plan)

    handed = []

    def broadcast(tensor, src, group=None, async_op=False):
        assert group is tp_group and src == 0
        handed.append((tuple(tensor.shape), tensor.device))
        if tp_rank != 0 and tensor.device.type == "meta":
            raise MetaHoldsNoData

    tp_group = TensorParallelPair(tp_rank)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_group", lambda *a, **k: tp_group)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda *a, **k: tp_rank)
    monkeypatch.setattr(torch.distributed, "get_process_group_ranks", lambda group: [0, 1])
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)

    if tp_rank == 0:
        batch = get_batch(iter([sample]), model)
        assert {k: (v.shape, v.device.type) for k, v in batch.items()} == {
            k: (v.shape, "meta") for k, v in sample.items()
        }
        assert len(handed) == 1 + len(sample)  # a header, then each tensor
    else:
        with pytest.raises(MetaHoldsNoData):
            get_batch(iter([]), model)
        assert len(handed) == 1
    assert all(device.type == "meta" for _, device in handed), handed


# torch functions that make a tensor on the default device unless given device=.
FACTORIES = {
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "range", "linspace",
    "logspace", "eye", "rand", "randn", "randint", "randperm", "empty_strided", "scalar_tensor",
}
# Modules that run collectives or build what meets the batch.
COLLECTIVE_MODULES = ("superposition", "core", "training", "bridge")


def _device_less_factories(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if func.attr == "cuda":  # `.cuda()` picks CUDA's current device, not the batch's
            yield node.lineno, ".cuda()"
        elif (func.attr in FACTORIES and isinstance(func.value, ast.Name) and func.value.id == "torch"
              and not any(k.arg == "device" for k in node.keywords)):
            yield node.lineno, f"torch.{func.attr}(...) without device="


def test_no_tensor_is_made_without_a_device():
    """A tensor made without device= lands on the CPU: NCCL refuses it in a collective and the
    GPU refuses to combine it with the batch. Data-loader samples are host tensors on purpose
    and say device="cpu"."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for package in COLLECTIVE_MODULES
        for path in sorted((PACKAGE / package).glob("*.py"))
        for line, what in _device_less_factories(path)
    ]
    assert not found, "tensors made on the default device:\n" + "\n".join(found)


def test_the_source_check_sees_a_device_less_tensor(tmp_path):
    """The check above flags what it is meant to flag."""
    module = tmp_path / "m.py"
    module.write_text("import torch\n"
                      "a = torch.tensor([1], device=x.device)\n"
                      "b = torch.zeros(\n    3, dtype=torch.int64)\n"
                      "c = y.cuda(non_blocking=True)\n")
    assert list(_device_less_factories(module)) == [
        (3, "torch.zeros(...) without device="), (5, ".cuda()"),
    ]


def test_forward_steps_share_one_target_weights_tensor(single_rank):
    """The phase-1 target weights are made once per (weights, device), not per micro-batch
    (on a GPU each new one is a host-to-device copy)."""
    from nemo_tst.training.step import forward_step

    plan = make_plan()
    model = build()
    weights = []
    for seed in range(3):
        _, loss_func = forward_step(iter([phase1_sample(plan, seed)]), model, plan=plan, eod_id=None)
        weights.append(loss_func.args[1])
    assert weights[0] is weights[1] is weights[2]
    torch.testing.assert_close(weights[0], torch.tensor(plan.superposition.weights(), dtype=torch.float32),
                               atol=0, rtol=0)
