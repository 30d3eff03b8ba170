"""Fixtures shared by the test modules, and the tier of every test (the table below).

Tiers (pytest markers, registered in pyproject.toml):

    unit       one process, no training run: the fast edit-test loop (`pytest -m unit`)
    multirank  gloo process groups in spawned processes (TP, PP, EP, CP against one rank)
    e2e        training runs through a trainer (`nemo-tst pretrain`, Bridge's pretrain,
               NeMo-Run, the demo), the golden loss curve, and scripts that launch them
    packaging  the wheel, the container, the launch scripts, and what a fresh interpreter
               imports of the package (its layering, a pip install's Megatron)

Every test file is listed in `TIERS`; a file missing from it stops the collection, so a new
test file is given a tier when it is added. `TEST_TIERS` moves single tests of a file to
another tier, and a test marked explicitly with a tier keeps it.
"""

import os
from pathlib import Path

import pytest
import torch.distributed as dist

from tests import te_absent_standin
from tests.distributed import free_port, init_megatron_parallel

# Megatron-Bridge imports with Transformer Engine absent only through this test stand-in (its
# docstring says exactly what it does and why nothing else sees it).
te_absent_standin.install()

TIERS = {
    "test_arguments.py": "unit",
    "test_argv.py": "unit",
    "test_attention.py": "unit",
    "test_bags.py": "unit",
    "test_benchmarks_loss_microbench.py": "unit",
    "test_benchmarks_quality.py": "unit",
    "test_bridge.py": "unit",
    "test_bridge_training.py": "e2e",
    "test_cli.py": "unit",
    "test_core_step.py": "unit",
    "test_cpu_support.py": "unit",
    "test_data_preprocess.py": "unit",
    "test_demo.py": "e2e",
    "test_demo_data.py": "unit",
    "test_demo_progress.py": "unit",
    "test_demo_report.py": "unit",
    "test_demo_results.py": "unit",
    "test_demo_runs.py": "unit",
    "test_demo_stats.py": "unit",
    "test_driver.py": "unit",
    "test_embedding.py": "unit",
    "test_errors.py": "unit",
    "test_experiment.py": "unit",
    "test_export_hf.py": "e2e",
    "test_golden_curve.py": "e2e",
    "test_gpu_path.py": "multirank",
    "test_gpu_smoke.py": "e2e",
    "test_hybrid.py": "unit",
    "test_hybrid_training.py": "e2e",
    "test_launchers.py": "packaging",
    "test_logs.py": "unit",
    "test_loss.py": "unit",
    "test_megatron_fixes.py": "unit",
    "test_model.py": "unit",
    "test_packaging.py": "packaging",
    "test_recipes.py": "unit",
    "test_run_lock.py": "unit",
    "test_settings.py": "unit",
    "test_training_data.py": "unit",
    "test_training_e2e.py": "e2e",
    "test_training_step.py": "unit",
    "test_wheel.py": "packaging",
}
"""Each test file's tier."""

TEST_TIERS = {
    ("test_bridge.py", "test_both_phases_bf16_distributed_optimizer_dp2"): "e2e",
    ("test_bridge.py", "test_importing_the_adapter_imports_no_bridge"): "packaging",
    ("test_bridge.py", "test_without_bridge_every_bridge_call_says_what_to_install"): "packaging",
    ("test_cpu_support.py", "test_tp2_matches_tp1_and_moe_ep2_and_pp2_run"): "multirank",
    ("test_embedding.py", "test_tensor_parallel_2_matches_full_table"): "multirank",
    ("test_experiment.py", "test_local_two_stage_experiment_on_cpu_trains_what_pretrain_trains"): "e2e",
    ("test_experiment.py", "test_the_readme_slurm_example_runs_unattended_as_written"): "packaging",
    ("test_golden_curve.py", "test_the_golden_curve_is_both_phases_and_learns"): "unit",
    ("test_hybrid.py", "test_pipeline_parallel_2_matches_pp1"): "multirank",
    ("test_hybrid.py", "test_tensor_parallel_2_matches_tp1"): "multirank",
    ("test_loss.py", "test_tensor_parallel_2_matches_full_vocab"): "multirank",
    ("test_megatron_fixes.py", "test_a_launch_without_tst_cpu_applies_the_fixes"): "packaging",
    ("test_megatron_fixes.py", "test_the_dataset_helpers_need_no_make_in_a_pip_install"): "packaging",
    ("test_model.py", "test_moe_expert_parallel_2_runs_phase1_and_matches_ep1"): "multirank",
    ("test_model.py", "test_tensor_parallel_2_matches_tp1"): "multirank",
    ("test_settings.py", "test_core_and_bridge_import_no_megatron_training"): "packaging",
    ("test_settings.py", "test_the_megatron_lm_adapter_does_not_import_bridge"): "packaging",
}
"""(file, test function) -> tier, where a test's tier is not its file's."""

TIER_NAMES = ("unit", "multirank", "e2e", "packaging")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    unlisted = sorted(p.name for p in here.glob("test_*.py") if p.name not in TIERS)
    if unlisted:
        raise pytest.UsageError(f"tests/conftest.py: give {', '.join(unlisted)} a tier in TIERS "
                                f"(one of {', '.join(TIER_NAMES)})")
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIER_NAMES):
            continue
        file = item.path.name
        name = getattr(item, "originalname", item.name)
        item.add_marker(TEST_TIERS.get((file, name), TIERS[file]))


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
