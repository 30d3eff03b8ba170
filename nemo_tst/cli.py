"""The `nemo-tst` command.

    nemo-tst pretrain [--nproc-per-node N] <Megatron-LM GPT arguments> --tst-bag-size S ...
    nemo-tst preprocess --input PATH [PATH ...] --output-prefix PREFIX (--tokenizer tokenizer.json
                        | --train-tokenizer --vocab-size V) [--workers W] [--held-out-fraction F]
    nemo-tst demo [--out DIR] [--bag-size 4] [--phase1-fraction 0.3] [--size ci|cpu|gpu]
    nemo-tst plan RECIPE [--gpus G] [--precision P] [section.field=value ...] [--json | --args]
                  [--corpus-tokens T] [--tokens-per-gpu-second X | --mfu M --peak-tflops F]
                  [--recipe-dir DIR]
    nemo-tst recipes [--recipe-dir DIR]
                 the built-in recipes (conf/recipes), DIR's <name>.yaml recipes
                 (same schema; they win over a built-in of the same name), precision presets
    nemo-tst run --factory RECIPE[(gpus=G, precision=P)] [recipe.section.field=value ...]
                 [run.executor=local|slurm|docker run.executor.FIELD=value ...] [--dryrun] [--yes]
                 NeMo-Run: phase 1 then phase 2 as a two-stage experiment
    nemo-tst export-hf RUN_DIR OUT [--iteration N] [--dtype bf16|fp32] [--allow-phase1]
                       [--overwrite] [--tokenizer tokenizer.json]
                 the trained model as a Hugging Face checkpoint (LlamaForCausalLM, Qwen3-MoE)

Every command validates its input before doing expensive work and exits non-zero with a
message naming the setting to fix.
"""

import argparse
import sys
import warnings
from pathlib import Path

from nemo_tst.errors import ArgumentParser, MissingExtra, fraction, positive_int, user_paths
from nemo_tst.training.logs import quiet_cuda_runtime_notice

# megatron-core warns at import about optional CUDA extensions (Apex, Transformer Engine) and
# experimental modules; none of it is actionable for a nemo-tst user.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|transformer-engine|absl|experimental).*")
# torch logs "No CUDA runtime is found, using CUDA_HOME=..." when megatron.core first imports
# torch.utils.cpp_extension on a machine with a CUDA toolkit but no usable GPU.
quiet_cuda_runtime_notice()

__all__ = ["main"]


def _pretrain_options(parser) -> None:
    """The options `nemo-tst pretrain` adds to Megatron-LM's and the --tst-* ones."""
    from nemo_tst.core.run_dir import RunDirectory

    parser.add_argument("--nproc-per-node", type=positive_int, default=1,
                        help="Processes (GPUs, or CPU ranks with --tst-cpu) on this machine.")
    parser.add_argument("--log-file", type=Path, default=None,
                        help=f"Append the trainer's whole output here (default: {RunDirectory('SAVE').log}) and "
                             "keep it off the terminal (default: the terminal shows its progress lines).")
    parser.add_argument("--megatron-help", action="store_true",
                        help="Show every Megatron-LM argument too, then exit.")


def _pretrain(rest: list[str]) -> None:
    if "-h" in rest or "--help" in rest or "--megatron-help" in rest:
        from nemo_tst.training.arguments import help_text

        print(help_text("nemo-tst pretrain", megatron="--megatron-help" in rest,
                        launcher_options=_pretrain_options))
        return
    parser = ArgumentParser(prog="nemo-tst pretrain", add_help=False, allow_abbrev=False)
    _pretrain_options(parser)
    opts, megatron_argv = parser.parse_known_args(rest)
    from nemo_tst.training.argv import last_value
    from nemo_tst.training.driver import run
    from nemo_tst.training.logs import progress_text

    def echo(line: str) -> None:
        text = progress_text(line)
        if text is not None:
            sys.stdout.write(text)
            sys.stdout.flush()

    paths = {"--save": last_value(megatron_argv, "--save"), "--log-file": opts.log_file,
             "--tst-tokenizer": last_value(megatron_argv, "--tst-tokenizer")}
    with user_paths(paths):
        plan = run(megatron_argv, nproc=opts.nproc_per_node, log_file=opts.log_file,
                   on_line=None if opts.log_file else echo)
    if plan.superposition.bag_size == 1:
        print(f"[nemo-tst] done: {plan.train_iters} iterations of ordinary training (s=1, one launch); "
              f"{plan.text_tokens_after(plan.train_iters):,} text tokens")
        return
    print(
        f"[nemo-tst] done: {plan.phase1_iters} phase-1 iterations (s={plan.superposition.bag_size})"
        f" + {plan.phase2_iters} phase-2 iterations; "
        f"{plan.text_tokens_after(plan.train_iters):,} text tokens"
    )


def _preprocess(rest: list[str]) -> None:
    from nemo_tst.data.cli import preprocess_main

    preprocess_main(rest)


def _demo(rest: list[str]) -> None:
    from nemo_tst.demo import demo_main

    demo_main(rest)


def _plan(rest: list[str]) -> None:
    from nemo_tst.recipes import format_plan, load_recipe, plan_report, recipe_names

    parser = ArgumentParser(
        prog="nemo-tst plan",
        description="Steps, text tokens and FLOPs per phase, the equal-FLOPs baseline, the data "
        "budget and estimated GPU-hours of a recipe, after validating it.",
    )
    parser.add_argument("recipe", help=f"one of {recipe_names()}, or a <name>.yaml of --recipe-dir")
    parser.add_argument("--recipe-dir", type=Path, default=None,
                        help="a directory of your own <name>.yaml recipes (the built-ins' schema); "
                             "one named like a built-in recipe wins")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. tst.bag_size=8")
    parser.add_argument("--gpus", type=positive_int, default=None, help="which parallel preset (1, 8, 64)")
    parser.add_argument("--precision", default="bf16", help="a preset of conf/precision.yaml")
    parser.add_argument("--corpus-tokens", type=_token_count, default=None,
                        help="unique training tokens available (default: counted from "
                             "data.prefix when it exists here)")
    parser.add_argument("--tokens-per-gpu-second", type=fraction(0, float("inf")), default=None,
                        help="measured throughput (positions/s per GPU) for the estimate")
    parser.add_argument("--mfu", type=fraction(0, 1, high_open=False), default=0.4,
                        help="model-FLOP utilisation in (0, 1], if no throughput")
    parser.add_argument("--peak-tflops", type=fraction(0, float("inf")), default=989.0,
                        help="per-GPU peak (H100 bf16 dense: 989)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--args", action="store_true",
                        help="print only the recipe's `nemo-tst pretrain` arguments (Megatron-LM "
                             "and --tst-*), one per line, for launch scripts")
    # Intermixed: overrides may follow options (`plan NAME --recipe-dir D tst.bag_size=8`);
    # parse_args would have consumed the empty override list right after NAME.
    opts = parser.parse_intermixed_args(rest)
    with user_paths({"--recipe-dir": opts.recipe_dir}):
        recipe = load_recipe(opts.recipe, gpus=opts.gpus, precision=opts.precision,
                             overrides=opts.overrides, recipe_dir=opts.recipe_dir)
    report = plan_report(recipe, corpus_tokens=opts.corpus_tokens,
                         tokens_per_gpu_second=opts.tokens_per_gpu_second, mfu=opts.mfu,
                         peak_tflops=opts.peak_tflops)
    if opts.args:  # recipes/pretrain_gpt_tst.sh reads these lines into its launch argv
        print("\n".join(report["megatron_args"]))
    elif opts.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_plan(report))


def _recipes(rest: list[str]) -> None:
    from nemo_tst.recipes import load_recipe, precision_names, recipe_names

    parser = ArgumentParser(
        prog="nemo-tst recipes",
        description="The built-in recipes, those of --recipe-dir, and the precision presets.",
    )
    parser.add_argument("--recipe-dir", type=Path, default=None,
                        help="a directory of your own <name>.yaml recipes (the built-ins' schema); "
                             "one named like a built-in recipe wins")
    opts = parser.parse_args(rest)
    with user_paths({"--recipe-dir": opts.recipe_dir}):
        recipes = {name: load_recipe(name, recipe_dir=opts.recipe_dir)  # its default parallel preset
                   for name in recipe_names(opts.recipe_dir)}
    for name, recipe in recipes.items():
        total, active = recipe.model.parameters()
        print(f"{name:22} {total / 1e9:7.2f}B ({active / 1e9:.2f}B active)  s={recipe.tst.bag_size}  "
              f"N={recipe.training.train_iters}  default gpus={recipe.parallel.num_gpus}")
    print(f"precision presets: {', '.join(precision_names())}")


def _run(rest: list[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("nemo_run") is None:
        raise MissingExtra("nemo-tst run needs NeMo-Run: pip install 'nemo-tst[nemo]' "
                            "(nemo-run 0.11.1 with leptonai 0.27.3)")
    from nemo_tst.recipes.experiment import main as run_main

    run_main(rest)


def _export_hf(rest: list[str]) -> None:
    parser = ArgumentParser(
        prog="nemo-tst export-hf",
        description="Write a TST run's trained model as a Hugging Face transformers checkpoint "
        "(config.json, model.safetensors, generation_config.json, the tokenizer).",
    )
    parser.add_argument("run_dir", type=Path, help="the run's --save directory")
    parser.add_argument("out", type=Path, help="directory to write (absent or empty)")
    parser.add_argument("--iteration", type=_iteration, default=None,
                        help="checkpoint to export (default: phase 2's final one)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--allow-phase1", action="store_true",
                        help="accept a phase-1 checkpoint for --iteration")
    parser.add_argument("--overwrite", action="store_true", help="replace an export in OUT")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json to ship (default: the run's --tst-tokenizer)")
    opts = parser.parse_args(rest)
    from nemo_tst.export import export_hf

    with user_paths({"RUN_DIR": opts.run_dir, "OUT": opts.out, "--tokenizer": opts.tokenizer}):
        out = export_hf(opts.run_dir, opts.out, iteration=opts.iteration, dtype=opts.dtype,
                        allow_phase1=opts.allow_phase1, overwrite=opts.overwrite, tokenizer=opts.tokenizer)
    print(f"[nemo-tst] wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _token_count(text: str) -> int:
    """argparse type: a token count >= 1, also written as 1e9."""
    import math

    value = float(text)
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of tokens >= 1")
    return int(value)


def _iteration(text: str) -> int:
    """argparse type: an iteration, a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not an iteration (a whole number >= 0)")
    return value


COMMANDS = {"pretrain": _pretrain, "preprocess": _preprocess, "demo": _demo, "plan": _plan,
            "recipes": _recipes, "run": _run, "export-hf": _export_hf}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnemo-tst: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    from nemo_tst.errors import run_command

    return run_command(f"nemo-tst {argv[0]}", lambda: COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
