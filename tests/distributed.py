"""Run a test body on several gloo ranks (spawned processes) on this CPU machine."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int = 2, *args) -> None:
    """Call fn(rank, world_size, *args) on `world_size` gloo ranks; a failing rank fails the test.

    fn must be a module-level function (it is pickled into the spawned processes).
    """
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def init_megatron_parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234) -> None:
    """Megatron on CPU: process groups and model-parallel RNG, on the gloo world already started."""
    from megatron.core import parallel_state

    from nemo_tst import cpu

    cpu.enable_megatron_cpu()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    cpu.seed_model_parallel(seed)
