"""Run a test body on several gloo ranks (spawned processes) on this CPU machine."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world_size, store_path, args):
    torch.set_num_threads(1)
    # A file store: no TCP port to pick, so no race with another process taking it.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int = 2, *args) -> None:
    """Call fn(rank, world_size, *args) on `world_size` gloo ranks; a failing rank fails the test.

    fn must be a module-level function (it is pickled into the spawned processes). A rank that
    dies from a signal before reporting (seen once here: an abort while a spawned interpreter
    started) is retried once; an exception raised by fn, e.g. a failed assertion, never is.
    """
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(_entry, args=(fn, world_size, os.path.join(tmp, "store"), args),
                         nprocs=world_size, join=True)
                return
            except mp.ProcessExitedException:
                if attempt == 2:
                    raise


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
