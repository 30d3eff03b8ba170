"""Fixtures shared by the test modules."""

import os

import pytest
import torch.distributed as dist

from tests import te_absent_standin
from tests.distributed import free_port, init_megatron_parallel

# Megatron-Bridge imports with Transformer Engine absent only through this test stand-in (its
# docstring says exactly what it does and why nothing else sees it).
te_absent_standin.install()


@pytest.fixture(scope="module")
def single_rank():
    """A gloo world of one process with Megatron's model-parallel state (TP=PP=EP=1) on CPU,
    torn down after the module, so that modules which need no process group see none."""
    started = not dist.is_initialized()
    if started:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    init_megatron_parallel()  # enable_megatron_cpu, TP=PP=1, seed_model_parallel
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()
