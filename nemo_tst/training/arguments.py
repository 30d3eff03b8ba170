"""`--tst-*` arguments for Megatron-LM's parser: to and from `TSTSettings`, and the run plan.

A Megatron GPT job becomes a TST job by switching its entry point to `nemo-tst pretrain` and
adding, at least, `--tst-bag-size`. Every other argument keeps its Megatron meaning; in
particular `--seq-length` is L, the number of latent positions the transformer runs on in both
phases (phase-1 samples hold s*L text tokens), and `--train-iters` counts both phases.

One WSD (or any) LR schedule spans the run: both phases carry the same `--train-iters N` and
schedule arguments (phase 1 stops at n1 through `--exit-interval`), so Megatron's resume check
passes without `--override-opt-param-scheduler`.

The checks every integration makes are `nemo_tst.core.plan.check_plan`'s; `plan_from_args`
adds what only Megatron-LM's arguments can get wrong, and names settings as flags
(`MEGATRON_NAMES`).
"""

import argparse
import math
import os
import threading
import types
from pathlib import Path
from typing import Optional

from nemo_tst.core.plan import TSTPlan, check_plan
from nemo_tst.core.settings import SETTING_FLAG, SettingNames, add_setting_arguments, settings_from_args

__all__ = [
    "MEGATRON_NAMES", "PHASES", "add_tst_arguments", "check_runtime", "check_unsupported_arguments",
    "check_with_megatron", "help_text", "import_problem", "parse_megatron_args", "plan_from_args",
]

PHASES = ("both", "1", "2")


def add_tst_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: adds the TST group to Megatron-LM's parser: a flag for
    each `TSTSettings` field, then the launch options that are not settings of the run."""
    group = parser.add_argument_group("token-superposition training")
    add_setting_arguments(group, MEGATRON_NAMES)
    group.add_argument("--tst-phase", choices=PHASES, default="both",
                       help="Run both phases, or only phase 1 / phase 2 (chained jobs).")
    group.add_argument("--tst-phase1-checkpoint", type=str, default=None,
                       help="Phase 2 only: phase 1's checkpoint directory, loaded when --load "
                            "holds no checkpoint yet (set by nemo-tst; lets a scheduler submit "
                            "both phases up front).")
    group.add_argument("--tst-attention", choices=("sdpa", "unfused"), default="sdpa",
                       help="Core attention without Transformer Engine (--transformer-impl "
                            "local): PyTorch scaled_dot_product_attention, or Megatron's "
                            "unfused softmax path.")
    group.add_argument("--tst-strict-data", action="store_true",
                       help="Fail instead of warning when the corpus is smaller than the plan.")
    group.add_argument("--tst-tokenizer", type=str, default=None,
                       help="Path of the tokenizer.json the data was preprocessed with "
                            "(gives the end-of-document id and the vocabulary size).")
    group.add_argument("--tst-cpu", action="store_true",
                       help="Run Megatron on CPU with gloo (nemo_tst/cpu.py): machines without "
                            "a GPU, tests.")
    return parser


MEGATRON_NAMES = SettingNames(
    setting=SETTING_FLAG,
    train_iters="--train-iters",
    seq_length="--seq-length",
    tensor_parallel="--tensor-model-parallel-size",
    sequence_parallel="--sequence-parallel",
    context_parallel="--context-parallel-size",
    decay_iters="--lr-decay-iters",
    wsd_decay_iters="--lr-wsd-decay-iters",
    mtp_num_layers="--mtp-num-layers",
    run_dir="--save",
)


def plan_from_args(args: argparse.Namespace) -> TSTPlan:
    """Validate the TST arguments against Megatron's and return the plan.

    Raises ValueError naming the setting and the fix, before any model or data is built.
    """
    settings = settings_from_args(args, MEGATRON_NAMES)
    check_unsupported_arguments(args)
    if not args.train_iters:
        raise ValueError(
            "TST plans in iterations: set --train-iters (sample-based --train-samples is not "
            "supported)"
        )
    if getattr(args, "rampup_batch_size", None):
        raise ValueError(
            "--rampup-batch-size is not supported with TST: phase boundaries are counted in "
            "samples of a fixed global batch; remove it"
        )
    N = args.train_iters
    for flag, value in (("--lr", args.lr), ("--min-lr", args.min_lr)):
        if value is not None and not (math.isfinite(value) and value >= 0 and (flag == "--min-lr" or value > 0)):
            raise ValueError(f"{flag}={value} must be a finite number {'> 0' if flag == '--lr' else '>= 0'}")
    if args.lr is not None and args.min_lr is not None and args.min_lr > args.lr:
        raise ValueError(f"--min-lr={args.min_lr} is above --lr={args.lr}: the schedule decays from "
                         "--lr down to --min-lr; lower --min-lr")
    for flag, value in (("--train-iters", N), ("--seq-length", args.seq_length),
                        ("--global-batch-size", args.global_batch_size),
                        ("--micro-batch-size", args.micro_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value} must be at least 1")
    decay = args.lr_decay_iters or N  # Megatron's default decay length
    if args.lr_warmup_iters and args.lr_warmup_iters >= decay:
        raise ValueError(
            f"--lr-warmup-iters={args.lr_warmup_iters} must be smaller than the decay length "
            f"({decay} iterations): the one LR schedule spans both phases"
        )
    wsd_anneal = None
    if args.lr_decay_style == "WSD":
        anneal = getattr(args, "lr_wsd_decay_iters", None)
        if anneal is None:
            # Megatron's scheduler asserts on it, but only after the model is built.
            raise ValueError(
                "--lr-decay-style WSD needs --lr-wsd-decay-iters (the annealing length); the "
                f"paper anneals over the last 10% of all steps: --lr-wsd-decay-iters {max(1, N // 10)}"
            )
        wsd_anneal = (decay, anneal)
    L = args.seq_length
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    plan = check_plan(
        MEGATRON_NAMES,
        settings,
        train_iters=N,
        seq_length=L,
        global_batch_size=args.global_batch_size,
        tensor_parallel=tp,
        sequence_parallel=args.sequence_parallel,
        context_parallel=cp,
        mtp_num_layers=getattr(args, "mtp_num_layers", None),
        wsd_anneal=wsd_anneal,
    )
    if getattr(args, "fp8", None):
        # Transformer Engine's FP8 GEMMs need the tokens of a micro-batch on a rank to be a
        # multiple of 16 (32 for MXFP8); in phase 1 those are latent positions, as in phase 2.
        multiple = 32 if getattr(args, "fp8_recipe", None) == "mxfp8" else 16
        split = cp * (tp if args.sequence_parallel else 1)
        tokens = L // split * args.micro_batch_size
        if L % split or tokens % multiple:
            raise ValueError(
                f"FP8 ({args.fp8}, recipe {getattr(args, 'fp8_recipe', None)}) needs the "
                f"{tokens} tokens of a micro-batch per rank (--seq-length {L} / {split} x "
                f"--micro-batch-size {args.micro_batch_size}) to be a multiple of {multiple}: "
                "pick --seq-length or --micro-batch-size accordingly"
            )
    return plan


def import_problem(module: str) -> Optional[str]:
    """None when `module` imports here, else why not ("ImportError: ..."). Importing, not
    finding: an installed package whose compiled extension cannot load (a Transformer Engine
    built for another torch or CUDA) is found by `importlib.util.find_spec` and still fails."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, OSError from a shared library, RuntimeError ...
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


# Model options Megatron-LM's own GPT builder honours and `pretrain.model_provider` does not
# build: (attribute, flag, what it asks for).
_MODEL_OPTIONS_NOT_BUILT = (
    ("multi_latent_attention", "--multi-latent-attention", "multi-latent attention (MLA)"),
    ("qk_l2_norm", "--qk-l2-norm", "QK L2 normalisation"),
    ("use_transformer_engine_op_fuser", "--use-transformer-engine-op-fuser", "Transformer Engine's op fuser"),
    ("experimental_attention_variant", "--experimental-attention-variant", "an experimental attention variant"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", "--heterogeneous-layers-config-encoded-json",
     "heterogeneous layers"),
    ("spec", "--spec", "a custom layer spec"),
)


def check_unsupported_arguments(args: argparse.Namespace) -> None:
    """Megatron-LM arguments this trainer cannot honour, refused with the reason and the fix
    (the Megatron-Bridge adapter refuses the same settings in Bridge's terms)."""
    for attr, flag, what in _MODEL_OPTIONS_NOT_BUILT:
        if getattr(args, attr, None):
            raise ValueError(
                f"{flag}: the TST model builder (nemo_tst.training.pretrain.model_provider) builds "
                f"Llama/Qwen-style GPT and MoE layers and does not build {what}; remove {flag}"
            )
    loader = getattr(args, "dataloader_type", None)
    if loader not in (None, "single"):
        raise ValueError(
            f"--dataloader-type {loader}: a sample's phase is its position in the data stream, "
            "which only Megatron's sequential sampler keeps (any other loader mixes phase-1 and "
            "phase-2 samples in one micro-batch); use --dataloader-type single (the default)"
        )
    graphs = [getattr(args, "cuda_graph_impl", None), *(getattr(args, "cuda_graph_modules", None) or []),
              *(getattr(args, "cuda_graph_scope_deprecated", None) or [])]
    if any("full_iteration" in str(g) for g in graphs if g is not None):
        raise ValueError(
            "full-iteration CUDA graphs (--cuda-graph-impl full_iteration) capture the whole "
            "step, and a TST step branches on the phase and checks the loss on the host; use "
            "per-layer graphs (--cuda-graph-impl local or transformer_engine) or none"
        )
    if getattr(args, "overlap_moe_expert_parallel_comm", False):
        raise ValueError(
            "--overlap-moe-expert-parallel-comm builds its schedule plan from token ids, which "
            "phase 1 does not embed one by one; remove it"
        )
    resume = (("finetune", "--finetune", "loads weights only and restarts at iteration 0"),
              ("no_load_optim", "--no-load-optim", "skips the optimizer and the LR schedule (the LR warms up again)"),
              ("no_save_optim", "--no-save-optim", "leaves the optimizer out of phase 1's checkpoint"),
              ("ckpt_step", "--ckpt-step", "pins the iteration loaded"),
              ("non_persistent_ckpt_type", "--non-persistent-ckpt-type", "writes checkpoints the phases do not track"))
    for attr, flag, why in resume:
        if getattr(args, attr, None):
            raise ValueError(
                f"{flag} {why}, but phase 2 resumes phase 1's weights, optimizer, LR schedule "
                f"and iteration (and a rerun resumes the latest checkpoint); remove {flag}"
            )
    for attr, flag in (("reset_position_ids", "--reset-position-ids"),
                       ("reset_attention_mask", "--reset-attention-mask")):
        if getattr(args, attr, False):
            raise ValueError(
                f"{flag} is not supported with TST: phase-1 positions are latent positions "
                f"0..L-1 over bags that may span documents; remove {flag}"
            )


def check_runtime(args: argparse.Namespace) -> None:
    """What this machine must provide for the arguments, checked where the job runs, before
    launch: Transformer Engine (importable, not merely installed) for FP8 and the TE layers, a
    Blackwell GPU for MXFP8, the TE or Apex kernel behind each fusion Megatron's defaults turn
    on, a C compiler for the functions Megatron compiles at start-up, a GPU unless the run is
    on CPU (`--tst-cpu`), and what a HybridModel (--hybrid-layer-pattern) needs."""
    import torch

    if args.fp8 and getattr(args, "fp8_recipe", None) == "mxfp8":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if capability is None or capability[0] < 10:
            found = f"compute capability {capability[0]}.{capability[1]}" if capability else "no GPU"
            raise ValueError(
                f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200), "
                f"found {found}: use --fp8-recipe delayed or tensorwise on Hopper "
                "(recipes: precision=fp8_delayed or fp8_current)"
            )
    te_problem = import_problem("transformer_engine.pytorch")
    wants_te = args.transformer_impl == "transformer_engine"
    if (args.fp8 or wants_te) and te_problem:
        asked = (f"--fp8-format {args.fp8}" if args.fp8 else "--transformer-impl transformer_engine")
        raise ValueError(
            f"{asked} needs Transformer Engine, which does not import here ({te_problem}): run "
            "in NVIDIA's NeMo or PyTorch container (docker/), install nemo-tst[te] for this torch "
            "and CUDA, or use bf16 with --transformer-impl local (recipes: precision=bf16 "
            "transformer_impl=local)"
        )
    _check_fusion_kernels(args, te_problem)
    on_cpu = getattr(args, "tst_cpu", False)
    if not on_cpu and not torch.cuda.is_available():
        raise ValueError(
            "this machine has no CUDA GPU, which Megatron-LM needs unless it runs on CPU: add "
            "--tst-cpu (gloo, plain PyTorch layers: slow, for tests and demos; recipes: cpu=true), "
            "or run where a GPU is"
        )
    if not on_cpu and _c_compiler() is None:
        raise ValueError(
            "no C compiler found (cc, gcc, clang or $CC): Megatron-LM compiles its fused "
            "bias-activation and bias-dropout functions with torch.compile when it starts, and "
            "triton builds its GPU launcher with the host C compiler; install one (e.g. "
            "`apt-get install gcc`) or set CC"
        )
    _check_hybrid_model(args, te_problem)


def _check_fusion_kernels(args: argparse.Namespace, te_problem: Optional[str]) -> None:
    """Each fusion Megatron's defaults turn on whose kernel does not import here, refused in one
    line naming every flag that turns one off (`nemo_tst.recipes.config.LOCAL_LAYERS_ARGS` holds
    them all)."""
    local = args.transformer_impl == "local"
    apex_problem = import_problem("apex") if local else None
    unfused_attention = local and getattr(args, "tst_attention", "sdpa") == "unfused"
    missing = []  # (flag, what needs the kernel)
    if getattr(args, "apply_rope_fusion", False) and te_problem:
        missing.append(("--no-rope-fusion", "fused RoPE needs Transformer Engine"))
    if getattr(args, "gradient_accumulation_fusion", False) and import_problem("fused_weight_gradient_mlp_cuda"):
        missing.append(("--no-gradient-accumulation-fusion",
                        "gradient-accumulation fusion needs Apex's fused_weight_gradient_mlp_cuda "
                        "(the output layer uses it whatever --transformer-impl is)"))
    # Megatron's parser gives `no_persist_layer_norm`; its validation derives persist_layer_norm.
    persist = getattr(args, "persist_layer_norm", not getattr(args, "no_persist_layer_norm", True))
    if local and persist and apex_problem:
        missing.append(("--no-persist-layer-norm",
                        "the persistent layer norm needs Apex (torch's norm refuses it)"))
    if unfused_attention and getattr(args, "masked_softmax_fusion", False) and \
            import_problem("scaled_masked_softmax_cuda"):
        missing.append(("--no-masked-softmax-fusion",
                        "the fused masked softmax needs Megatron's/Apex's CUDA softmax kernels"))
    if missing:
        raise ValueError(
            f"{'; '.join(why for _, why in missing)}, and they do not import here: add "
            f"{' '.join(flag for flag, _ in missing)} (or run where Transformer Engine and Apex "
            "are installed, e.g. NVIDIA's NeMo container)"
        )
    if local and args.sequence_parallel and apex_problem:
        raise ValueError(
            "--sequence-parallel with --transformer-impl local needs Apex's FusedLayerNorm "
            "(torch's norm in Megatron's local layers does not support sequence parallel), "
            "which does not import here: drop --sequence-parallel or use --transformer-impl "
            "transformer_engine"
        )


def _c_compiler() -> Optional[str]:
    import shutil

    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _check_hybrid_model(args: argparse.Namespace, te_problem: Optional[str]) -> None:
    """With --hybrid-layer-pattern (a `TSTHybridModel`): Transformer Engine, which megatron-core's
    HybridStack builds its final norm with whatever the layer spec (on CPU, --tst-cpu stands in
    for it), and, with --transformer-impl local, a pattern of attention and MLP layers only."""
    from nemo_tst.superposition.model import check_transformer_pattern

    pattern = getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None)
    if pattern is None:
        return
    if not getattr(args, "tst_cpu", False) and te_problem:
        raise ValueError(
            f"--hybrid-layer-pattern needs Transformer Engine, which does not import here ({te_problem}): "
            "megatron-core's HybridStack builds its final norm with TE's TENorm whatever the "
            "layer spec; run in NVIDIA's NeMo or PyTorch container (docker/), install "
            "nemo-tst[te], or train the same layers as a GPT model (a pattern '*-' repeated N "
            "times is --num-layers N without --hybrid-layer-pattern)"
        )
    if args.transformer_impl == "local":
        check_transformer_pattern(
            pattern, "--transformer-impl local",
            "; Megatron's other hybrid layers (Mamba, MoE, ...) need --transformer-impl transformer_engine",
        )
    if getattr(args, "use_rope_scaling", False):
        raise ValueError(
            "--use-rope-scaling with --hybrid-layer-pattern: megatron-core's HybridModel has no "
            "RoPE scaling (it would be ignored); remove one of them"
        )


def check_with_megatron(args: argparse.Namespace, world_size: int) -> None:
    """Megatron-LM's own `validate_args`, run here on a copy, before any launch: whatever
    Megatron would refuse inside every rank (a NaN or negative LR, --min-lr above --lr, a
    zero micro-batch, ...) is refused now, with the rule Megatron checks. Its notices go
    nowhere. Without CUDA on this machine (the job may run elsewhere), the questions validation
    asks of the GPU are left to the ranks: its architecture is answered "none" (0), and the
    grouped-GEMM compute-capability check is skipped.

    Nothing of the process changes, so runs can be checked from several threads at once (the
    demo checks its two side by side): validation runs as a private copy of Megatron's
    functions (`_private_copy`) whose `os.environ` is the environment the driver's launches
    give every rank, whose prints and warnings are dropped, and whose GPU questions are
    answered as above; `--deterministic-mode`'s checks run the same way, without turning on
    torch's deterministic algorithms in this process."""
    import copy
    import traceback

    import torch

    megatron = _megatron_arguments()
    trial = copy.deepcopy(args)
    trial.rank, trial.world_size = 0, world_size
    if not torch.cuda.is_available():
        trial.moe_grouped_gemm = False  # its check reads the GPU's compute capability
    # What the driver's launches set for every rank (Megatron checks it under TP or CP).
    rank_os = _os_with_environment(dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1"))
    arch = megatron.get_device_arch_version if torch.cuda.is_available() else (lambda: 0)
    silent = {name: _discard for name in ("print", "print_rank_0", "warn_rank_0", "_print_args")}
    validate = _private_copy(megatron, os=rank_os, get_device_arch_version=arch, **silent)["validate_args"]
    try:
        if trial.deterministic_mode:
            from megatron.training import determinism

            no_global_switch = types.SimpleNamespace(use_deterministic_algorithms=_discard)
            _private_copy(determinism, os=rank_os, torch=no_global_switch)["apply_determinism_to_args"](trial)
            trial.deterministic_mode = False  # checked just now; validate_args would redo it globally
        validate(trial, {})
    except (AssertionError, ValueError, TypeError, RuntimeError) as err:
        frames = traceback.extract_tb(err.__traceback__)
        rule = str(err).strip() or (frames[-1].line or "").strip().removeprefix("assert ")
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        raise ValueError(
            f"Megatron-LM refuses these arguments: {_as_flags(rule)}{where}; change the argument "
            "it names"
        ) from None


def _discard(*args, **kwargs) -> None:
    return None


def _os_with_environment(environment: dict) -> types.ModuleType:
    """The `os` module as code sees it through a namespace of its own: the same functions, with
    `environment` as `os.environ` and `os.getenv`'s source."""
    view = types.ModuleType("os")
    view.__dict__.update(vars(os))
    view.environ, view.getenv = environment, environment.get
    return view


def _private_copy(module: types.ModuleType, **overrides) -> dict:
    """`module`'s namespace with `overrides`, and every function the module defines rebound to
    that namespace: a function called from it finds the overrides (`print`, `os`, ...) where it
    looks up its globals, in itself and in the module's functions it calls, while the module
    and every other caller of it are untouched."""
    namespace = dict(vars(module), **overrides)
    for name, value in vars(module).items():
        own = isinstance(value, types.FunctionType) and value.__module__ == module.__name__
        if own and name not in overrides:
            rebound = types.FunctionType(value.__code__, namespace, value.__name__, value.__defaults__,
                                         value.__closure__)
            rebound.__kwdefaults__ = value.__kwdefaults__
            namespace[name] = rebound
    return namespace


class _MegatronParser(argparse.ArgumentParser):
    """Megatron-LM's parser as `nemo-tst pretrain` reads it: a bad argument raises a one-line
    `UsageError` (not Megatron's 4,000-line usage text and an exit), from this parser alone."""

    def error(self, message):
        from nemo_tst.errors import UsageError

        raise UsageError(f"{message} (nemo-tst pretrain --help lists the --tst-* arguments, "
                         "--megatron-help Megatron-LM's)")


def parse_megatron_args(argv: list[str]) -> argparse.Namespace:
    """Megatron-LM's arguments plus the TST group, parsed from `argv` as each rank will parse
    them (`megatron.training.arguments.parse_args`), without Megatron's validation and without
    touching the process: the parser is this call's own (no `sys.argv`, no process-wide error
    handler), so several threads can parse at once (the demo plans its runs side by side)."""
    megatron = _megatron_arguments()
    parser = _MegatronParser(description="Megatron-LM Arguments", allow_abbrev=False)
    megatron.add_megatron_arguments(parser)
    add_tst_arguments(parser)
    args = parser.parse_args(argv)
    if args.yaml_cfg is not None:
        parser.error("--yaml-cfg replaces every argument, the --tst-* ones included; give the "
                     "arguments on the command line")
    # What Megatron's parse_args adds after parsing. (Its --enable-msc switch is a process-wide
    # feature flag; each rank sets it for itself, and nothing here reads through it.)
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None
    args.rank = int(os.environ.get("RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return args


_MEGATRON_IMPORT = threading.Lock()
_megatron_module = None


def _megatron_arguments() -> types.ModuleType:
    """`megatron.training.arguments`, imported quietly the first time.

    Importing Megatron's trainer imports optional packages that warn as they load (NVIDIA
    Model Optimizer's version notices and deprecations, say); that stays off the launcher's
    terminal (each rank's copy goes to the run's log). Warning filters are process-wide, so
    the one import that silences them runs under a lock; after it, nothing here touches them."""
    global _megatron_module
    with _MEGATRON_IMPORT:
        if _megatron_module is None:
            import warnings

            from nemo_tst.training.logs import quiet_cuda_runtime_notice

            quiet_cuda_runtime_notice()  # before megatron.core is imported (see its docstring)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from megatron.training import arguments
            _megatron_module = arguments
    return _megatron_module


def _as_flags(text: str) -> str:
    """`args.min_lr <= args.lr` -> `--min-lr <= --lr`: Megatron's rule in the user's spelling."""
    import re

    return re.sub(r"\bargs\.([a-z0-9_]+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; prints a help string as written when it is not a valid %-template
    (one of Megatron-LM's holds a bare `%`, which crashes argparse's own help)."""

    def _expand_help(self, action):
        try:
            return super()._expand_help(action)
        except (ValueError, TypeError, KeyError):
            return self._get_help_string(action)


def help_text(prog: str, *, megatron: bool, launcher_options=None) -> str:
    """The help of `nemo-tst pretrain`: its own and the --tst-* options with their defaults
    (and, with `megatron`, every Megatron-LM option too). `launcher_options(parser)` adds the
    caller's own options."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_HelpFormatter, allow_abbrev=False,
        description="Two-phase TST pretraining with Megatron-LM's trainer: phase 1 trains on bags of "
        "s tokens for the first r of --train-iters, phase 2 is ordinary next-token training "
        "resumed from it. Every argument not listed here is a Megatron-LM GPT argument, with "
        "its Megatron meaning (--seq-length is L, the latent positions of phase 1).",
        epilog=None if megatron else f"Megatron-LM's own arguments: {prog} --megatron-help",
    )
    if launcher_options is not None:
        launcher_options(parser)
    if megatron:
        from megatron.training.arguments import add_megatron_arguments

        add_megatron_arguments(parser)
    add_tst_arguments(parser)
    return parser.format_help()
