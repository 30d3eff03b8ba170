"""NeMo-Run: the two-phase TST run as a two-stage experiment, recipe factories, executors.

    nemo-tst run --factory tst_qwen3_10b_a1b(gpus=64) recipe.data.prefix=/data/mix \\
        recipe.run_dir=/ckpt/moe run.executor=slurm run.executor.account=ACC --dryrun

Stage 1 runs phase 1 (superposition) and stage 2 runs phase 2 (recovery); stage 2 depends on
stage 1, which Slurm turns into `--dependency=afterok:<phase-1 job>` and the local and Docker
executors into running them in order. Each stage is `torchrun ... -m
nemo_tst.training.pretrain <recipe's Megatron arguments> --tst-phase k` on every node; the
arguments of both stages are fixed at submission (`nemo_tst.training.argv.phase_argv`), each rank works out at
start where its phase resumes (`nemo_tst.core.run_dir`), and a stage whose phase is already
complete exits at once, so resubmitting the same experiment resumes the run. A recipe with
`tst.bag_size=1` (a baseline) has no superposition phase: one stage, phase 2, trains all N
iterations, as `nemo-tst pretrain` does (`nemo_tst.core.plan.run_phases`).

Executors (`run.executor=NAME`, their fields as `run.executor.FIELD=...`): `local` (torchrun on this
machine, GPUs or CPU ranks), `slurm` (sbatch with a container image and mounts, over a local or
SSH tunnel), `docker` (one container on this host). Nodes and processes per node come from the
recipe's parallel layout.
"""

import os
import sys
from pathlib import Path
from typing import Optional

import nemo_run as run

from nemo_tst.core.plan import TSTPlan, run_phases
from nemo_tst.errors import RunFailed
from nemo_tst.recipes import catalog
from nemo_tst.recipes.config import TSTRecipe
from nemo_tst.recipes.plan import check_recipe

__all__ = [
    "add_phases", "docker_executor", "local_executor", "phase_tasks", "pretrain", "recipe_config",
    "slurm_executor", "two_phase_experiment",
]

PHASE_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}


def phase_tasks(recipe: TSTRecipe, plan: TSTPlan) -> list[tuple[int, run.Script]]:
    """[(1, phase-1 script), (2, phase-2 script)]: each rank's command for each phase (only
    phase 2, the whole run, at s = 1); `plan` is what `check_recipe(recipe, ...)` returned."""
    from nemo_tst.training.argv import phase_argv

    if not recipe.run_dir:
        raise ValueError("recipe.run_dir is not set: recipe.run_dir=/path/to/checkpoints")
    argv = recipe.megatron_args()
    return [
        (phase, run.Script(path="nemo_tst.training.pretrain", m=True, entrypoint="python",
                           args=phase_argv(argv, phase, Path(recipe.run_dir), plan.phase1_iters),
                           env=dict(PHASE_ENV)))
        for phase in run_phases(plan)
    ]


def _fit_executor(executor: run.Executor, recipe: TSTRecipe) -> run.Executor:
    """The executor sized by the recipe: nodes x processes per node, torchrun on each node."""
    executor = executor.clone()
    executor.nodes = recipe.parallel.nodes
    executor.ntasks_per_node = recipe.parallel.procs_per_node
    if isinstance(executor, run.SlurmExecutor):
        executor.job_name_prefix = executor.job_name_prefix or f"{recipe.name}-"
        executor.gpus_per_node = None if recipe.cpu else recipe.parallel.procs_per_node
        executor.torchrun_nproc_per_node = recipe.parallel.procs_per_node
    elif isinstance(executor, run.DockerExecutor) and not recipe.cpu:
        executor.num_gpus = recipe.parallel.procs_per_node
    elif isinstance(executor, run.LocalExecutor):
        # torchrun of this interpreter's environment, also when it is not activated
        bin_dir = os.path.dirname(sys.executable)
        executor.env_vars = {**executor.env_vars,
                             "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    executor.launcher = "torchrun"
    return executor


def two_phase_experiment(recipe: TSTRecipe, executor: run.Executor, *,
                         name: Optional[str] = None) -> run.Experiment:
    """An empty NeMo-Run experiment sized for `recipe`; add the phases inside `with exp:`."""
    return run.Experiment(name or recipe.name, executor=_fit_executor(executor, recipe),
                          log_level="WARN")


def add_phases(exp: run.Experiment, recipe: TSTRecipe, plan: TSTPlan) -> list[str]:
    """Add phase 1 and phase 2 (depending on phase 1) to `exp`, on the executor
    `two_phase_experiment` sized (phase 2 alone at s = 1); call inside `with exp:`."""
    handles = []
    for phase, script in phase_tasks(recipe, plan):
        handles.append(exp.add(script, executor=exp.executor, name=f"phase{phase}",
                               dependencies=handles[-1:] or None))
    return handles


def recipe_config(name: str, *, gpus: Optional[int] = None, precision: str = "bf16",
                  overrides: tuple = ()) -> run.Config[TSTRecipe]:
    """A catalog recipe as a NeMo-Run config (so `recipe.section.field=value` overrides apply)."""
    import fiddle as fdl
    import fiddle._src.experimental.dataclasses as fdl_dc

    recipe = catalog.load_recipe(name, gpus=gpus, precision=precision, overrides=overrides)
    return fdl.cast(run.Config, fdl_dc.convert_dataclasses_to_configs(recipe, allow_post_init=True))


@run.cli.entrypoint(namespace="nemo_tst", type="experiment",
                    help="Two-phase TST pretraining (phase 2 after phase 1) on a NeMo-Run executor")
def pretrain(ctx: run.cli.RunContext, recipe: TSTRecipe, check_local: Optional[bool] = None):
    """Build the two-stage experiment for `recipe` and launch it (or print it with --dryrun).

    check_local: run the on-machine checks (data, tokenizer, Transformer Engine, run
    directory) before launch; default: yes for the local executor, no for Slurm/Docker."""
    if ctx.executor is None:  # NeMo-Run would otherwise run the tasks in this process
        ctx.executor = run.LocalExecutor(launcher="torchrun", env_vars=dict(PHASE_ENV))
    executor = ctx.executor
    if check_local is None:
        check_local = isinstance(executor, run.LocalExecutor)
    # Cluster paths are not visible here: for Slurm/Docker only the recipe itself is checked.
    args, plan = check_recipe(recipe, local=check_local)
    if check_local and not ctx.dryrun:
        from nemo_tst.training.driver import claim_run_directory

        claim_run_directory(Path(recipe.run_dir), args, plan)  # refuses another run's directory
    name = ctx.name if ctx.name and ctx.name != "pretrain" else recipe.name
    exp = two_phase_experiment(recipe, executor, name=name)
    with exp:
        add_phases(exp, recipe, plan)
        ctx.launch(exp)  # phase 2 waits for phase 1 through its dependency


def _recipe_factory(name: str):
    def factory(gpus: Optional[int] = None, precision: str = "bf16") -> run.Partial[pretrain]:
        return run.Partial(pretrain, recipe=recipe_config(name, gpus=gpus, precision=precision))

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"Recipe {name} (conf/recipes/{name}.yaml): `gpus` picks its "
                       "parallel preset, `precision` one of conf/precision.yaml.")
    return run.cli.factory(factory, target=pretrain, name=name)


# Never silently empty: recipe_names() raises FileNotFoundError when the package lacks its recipes.
RECIPE_FACTORIES = {name: _recipe_factory(name) for name in catalog.recipe_names()}


@run.cli.factory(name="local")
def local_executor() -> run.Config[run.LocalExecutor]:
    """torchrun on this machine (GPUs, or CPU ranks for a recipe with cpu=true)."""
    return run.Config(run.LocalExecutor, launcher="torchrun", env_vars=dict(PHASE_ENV))


@run.cli.factory(name="slurm")
def slurm_executor(
    account: str = "",
    partition: Optional[str] = None,
    time: str = "04:00:00",
    container_image: str = "nemo-tst:latest",
    container_mounts: Optional[list[str]] = None,
    job_dir: str = "",
    host: Optional[str] = None,
    user: Optional[str] = None,
) -> run.Config[run.SlurmExecutor]:
    """sbatch with pyxis/enroot containers; submits from this machine (LocalTunnel) or over SSH
    (`host`, `user`). The image must contain nemo-tst (docker/Dockerfile): no code is
    packaged. Mount the data and run directory into the container."""
    tunnel = (run.Config(run.SSHTunnel, host=host, user=user or "", job_dir=job_dir) if host
              else run.Config(run.LocalTunnel, job_dir=job_dir))
    return run.Config(
        run.SlurmExecutor,
        account=account, partition=partition, time=time, container_image=container_image,
        container_mounts=list(container_mounts or []), tunnel=tunnel, launcher="torchrun",
        exclusive=True, env_vars=dict(PHASE_ENV), packager=run.Config(run.Packager),
    )


@run.cli.factory(name="docker")
def docker_executor(
    container_image: str = "nemo-tst:latest",
    volumes: Optional[list[str]] = None,
    shm_size: str = "32g",
) -> run.Config[run.DockerExecutor]:
    """One container on this host (the image built from docker/Dockerfile)."""
    return run.Config(
        run.DockerExecutor, container_image=container_image, volumes=list(volumes or []), shm_size=shm_size,
        ipc_mode="host", launcher="torchrun", env_vars=dict(PHASE_ENV),
        packager=run.Config(run.Packager),
    )


def check_run_arguments(argv: list[str]) -> None:
    """Refuse an unknown recipe factory or `recipe.*` override key with the valid choices,
    before NeMo-Run parses them (its own errors print the whole configuration)."""
    import re

    for i, arg in enumerate(argv):
        value = None
        if arg in ("--factory", "-f") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--factory="):
            value = arg.split("=", 1)[1]
        if value is not None:
            name = re.match(r"^\s*([\w.]+)", value)
            if not name or name.group(1) not in RECIPE_FACTORIES:
                raise ValueError(f"unknown recipe {value!r} for --factory; choose one of "
                                 f"{sorted(RECIPE_FACTORIES)} (conf/recipes/)")
        elif arg.startswith("recipe.") and "=" in arg:
            catalog.resolve_override_key(arg.split("=", 1)[0])
    if not any(a in ("--factory", "-f") or a.startswith("--factory=") for a in argv) and not any(
            a in ("-h", "--help") for a in argv):
        raise ValueError(f"choose a recipe with --factory NAME, one of {sorted(RECIPE_FACTORIES)}")


def main(argv: list[str]) -> None:
    """`nemo-tst run ...`: NeMo-Run's CLI over `pretrain` (see the module docstring)."""
    import typer

    check_run_arguments(argv)
    saved = sys.argv
    sys.argv = ["nemo-tst run", *argv]
    try:
        # What run.cli.main(pretrain) does, minus dropping the exit status: NeMo-Run 0.11.1
        # turns any error into typer.Exit(1), which click returns under standalone_mode=False.
        app = typer.Typer(help=pretrain.cli_entrypoint.help_str, pretty_exceptions_enable=False)
        pretrain.cli_entrypoint._add_command(app, is_main=True, cmd_defaults=None)
        status = app(standalone_mode=False)
    finally:
        sys.argv = saved
    if isinstance(status, int) and status != 0:
        raise RunFailed(f"NeMo-Run stopped with status {status}; its message is above")
