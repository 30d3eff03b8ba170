"""Which checkpoint of a TST run to export, and its weights as whole (unsharded) tensors.

A TST run directory (`nemo-tst pretrain --save RUN`) holds a manifest and one Megatron save
directory per phase (`nemo_tst.core.run_dir.RunDirectory`). The export reads only a checkpoint
the trainer would resume from: a complete one at or before its phase's tracked iteration, by
the rule the driver applies (`RunDirectory.complete_iterations`).

The checkpoint is read with megatron-core's own dist-checkpointing: its tensor metadata gives
every tensor's global shape, and loading a request of whole tensors makes Megatron assemble
them from however many tensor- or pipeline-parallel shards were saved. So a checkpoint saved
at TP=2 or PP=2 reads back as exactly the tensors a world-size-1 run would have saved (Megatron
stores the fused QKV and SwiGLU fc1 in their TP=1 layout and layers under their global index).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nemo_tst.core.run_dir import RunDirectory, usable_checkpoint

__all__ = ["CheckpointChoice", "choose_checkpoint", "read_checkpoint", "unstack_layers"]

# Keys under this prefix hold optimizer state (Adam moments, fp32 main params), not the model.
OPTIMIZER_PREFIX = "optimizer."


@dataclass(frozen=True)
class CheckpointChoice:
    """One complete Megatron checkpoint of a TST run."""

    path: Path
    """The checkpoint's directory (`RunDirectory.iteration_dir`)."""
    phase: int
    iteration: int
    final_iteration: Optional[int]
    """The plan's last iteration N, when the run directory's manifest records it."""


def _damage(run: RunDirectory) -> str:
    """' (damaged: ...)' for the phases whose newest checkpoints are damaged, else ''."""
    problems = [p for phase in (2, 1) for p in usable_checkpoint(run.phase_dir(phase))[1]]
    return f" (damaged: {'; '.join(problems)})" if problems else ""


def choose_checkpoint(run_dir: Path, iteration: Optional[int], allow_phase1: bool) -> CheckpointChoice:
    """The checkpoint to export: phase 2's final one by default, or `iteration` (looked up in
    phase 2, then phase 1). A phase-1 checkpoint needs `allow_phase1`, unless the run's bag
    size is 1 (a baseline, whose phase 1 is ordinary training)."""
    run = RunDirectory(run_dir)
    if not run.root.is_dir():
        raise ValueError(f"RUN_DIR {run_dir} does not exist; pass the --save directory of a "
                         "nemo-tst pretrain run")
    if not run.is_run():
        raise ValueError(f"RUN_DIR {run_dir} is not a TST run directory (no {run.manifest.name}, "
                         "no phase checkpoints); pass the --save directory of a nemo-tst "
                         "pretrain run")
    plan = run.recorded_plan()
    final = plan.get("train_iters")
    # At s = 1 phase 1 is ordinary next-token training: nothing to recover from.
    superposed = plan.get("superposition", {}).get("bag_size") != 1
    phase2 = run.phase_dir(2)

    if iteration is None:
        latest = run.latest_complete(2)  # what a resume of phase 2 would load
        if latest is None:
            raise ValueError(
                f"{phase2} holds no complete checkpoint{_damage(run)}: the run has not reached "
                "phase 2; finish it (rerun the same nemo-tst pretrain command), or pick a phase-1 "
                f"checkpoint with --iteration N --allow-phase1 (phase 1 has "
                f"{run.complete_iterations(1) or 'none'})"
            )
        if final is not None and latest != final:
            raise ValueError(
                f"{phase2} is at iteration {latest} of the plan's {final}{_damage(run)}: the run is "
                "unfinished; finish it (rerun the same nemo-tst pretrain command), or export this "
                f"checkpoint anyway with --iteration {latest}"
            )
        return CheckpointChoice(run.iteration_dir(2, latest), 2, latest, final)

    for phase in (2, 1):
        if not run.is_complete(phase, iteration):
            continue
        if phase == 1 and superposed and not allow_phase1:
            raise ValueError(
                f"--iteration {iteration} is a phase-1 checkpoint ({run.iteration_dir(1, iteration)}): "
                "phase 1 trains on bag-averaged inputs with multi-hot targets, and only phase 2 "
                "recovers ordinary next-token prediction, so it is not the run's final model; "
                "pass --allow-phase1 to export it anyway, or pick a phase-2 iteration "
                f"({run.complete_iterations(2) or 'none yet'})"
            )
        return CheckpointChoice(run.iteration_dir(phase, iteration), phase, iteration, final)
    p1, p2 = run.complete_iterations(1), run.complete_iterations(2)
    raise ValueError(
        f"--iteration {iteration}: no complete checkpoint of that iteration in {run_dir}{_damage(run)}; "
        f"phase 2 has {p2 or 'none'}, phase 1 has {p1 or 'none'}"
    )


@contextlib.contextmanager
def _one_process_group():
    """dist-checkpointing asks torch.distributed for the rank: give it a world of one (a file
    store, so no port is taken) unless the caller already runs one."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ValueError(
                f"export_hf runs in one process, but this one is rank {dist.get_rank()} of a "
                f"world of {dist.get_world_size()}; call it from a single process"
            )
        yield
        return
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def read_checkpoint(path: Path):
    """(Megatron's saved `args` namespace, {checkpoint key: whole tensor}) for the model's
    weights; optimizer state is not read."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    path = Path(path)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise ValueError(f"{path} is not a torch_dist checkpoint (metadata.json missing); "
                         "export-hf reads checkpoints saved with --ckpt-format torch_dist")
    common = dist_checkpointing.load_common_state_dict(str(path))
    args = common.get("args")
    if args is None:
        raise ValueError(f"{path} holds no Megatron arguments in its common state; it was not "
                         "saved by Megatron's trainer (nemo-tst pretrain)")
    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    # A request for each whole tensor (metadata entries carry the global shape, no offsets):
    # Megatron gathers it from the shards of every rank that saved it.
    request = {key: tensor for key, tensor in metadata.items()
               if isinstance(tensor, ShardedTensor) and not key.startswith(OPTIMIZER_PREFIX)}
    with _one_process_group():
        loaded = dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    return args, {key: loaded[key] for key in request}


def unstack_layers(tensors: dict, num_layers: int) -> dict:
    """Per-layer keys `decoder.layers.{i}.<name>`: Megatron saves the layers of a homogeneous
    block stacked along a leading axis of length num_layers (`decoder.layers.<name>` [L, ...]);
    per-layer keys, when a checkpoint has them, are kept as they are."""
    out = {}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition("decoder.layers.")
        if prefix or not rest or rest.split(".", 1)[0].isdigit():
            out[key] = tensor
            continue
        if tensor.dim() == 0 or tensor.shape[0] != num_layers:
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, not "
                             f"[num_layers={num_layers}, ...]: its layers cannot be told apart")
        for layer in range(num_layers):
            out[f"decoder.layers.{layer}.{rest}"] = tensor[layer]
    return out
