"""Check a recipe before launch, and say what it will cost: `nemo-tst plan`.

Both phases run the transformer on L positions per sample, so a TST step costs what a
baseline step costs; what changes is the text read. Per run of N steps, batch B, bag size s
and phase-1 fraction r (n1 = r·N steps):

    FLOPs                = N · B · L · (FLOPs per position)        (same as the baseline's)
    text tokens, TST     = n1 · B · s·L + (N - n1) · B · L  = (1 + (s-1)·r) · N·B·L
    text tokens, baseline= N · B · L                                 (equal FLOPs)

TST reads (1 + (s-1)·r)× the baseline's text, so it needs that many unique tokens; with a
smaller corpus tokens repeat, the paper's data-bound regime where TST loses to the baseline.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Optional

from nemo_tst.recipes.config import TSTRecipe

__all__ = ["check_recipe", "format_plan", "plan_report"]

H100_BF16_DENSE_TFLOPS = 989.0


def check_recipe(recipe: TSTRecipe, *, local: bool):
    """Validate a recipe as `nemo-tst pretrain` would, before anything is launched.

    Always: the TST settings, parallel layout vs GPU count, batch divisibility, SP/CP/FP8
    token rules (Megatron's own parser reads the arguments). `local`: also what can only be
    checked where the job runs: data and tokenizer on disk, Transformer Engine for FP8, the
    GPU generation for MXFP8, and the run directory (the same checks as `nemo-tst pretrain`).
    Returns (Megatron args namespace, TSTPlan). Raises ValueError naming the fix."""
    from nemo_tst.training.arguments import check_with_megatron, parse_megatron_args, plan_from_args
    from nemo_tst.training.driver import check_before_launch, check_parallel_layout

    if recipe.parallel.num_gpus < 1:
        raise ValueError(f"parallel.num_gpus={recipe.parallel.num_gpus} must be at least 1")
    argv = recipe.megatron_args()
    args = parse_megatron_args(argv)
    plan = plan_from_args(args)
    check_parallel_layout(args, recipe.parallel.num_gpus)
    if not local:
        check_with_megatron(args, recipe.parallel.num_gpus)  # (check_before_launch does it too)
    if local:
        if not recipe.run_dir:
            raise ValueError("run_dir is not set: run_dir=/path/to/checkpoints (phase 1 and 2 "
                             "save under it)")
        if not recipe.data.prefix:
            raise ValueError("data.prefix is not set: data.prefix=PREFIX as written by "
                             "`nemo-tst preprocess --output-prefix PREFIX`")
        check_before_launch(argv, args, plan, recipe.parallel.num_gpus)  # as nemo-tst pretrain
    return args, plan


def _corpus_tokens(recipe: TSTRecipe) -> Optional[int]:
    """Tokens in PREFIX_train when it exists here (else None: not known on this machine)."""
    if not recipe.data.prefix or not Path(f"{recipe.data.prefix}_train.idx").is_file():
        return None
    from nemo_tst.training.driver import count_tokens

    return count_tokens([f"{recipe.data.prefix}_train"])


def plan_report(recipe: TSTRecipe, *, corpus_tokens: Optional[int] = None,
                tokens_per_gpu_second: Optional[float] = None, mfu: float = 0.4,
                peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> dict:
    """Steps, text tokens and FLOPs per phase, the equal-FLOPs baseline, the data budget and
    a GPU-hours estimate (from a measured throughput in positions/s/GPU, else from MFU)."""
    _, plan = check_recipe(recipe, local=False)
    model, B, L = recipe.model, plan.global_batch_size, plan.seq_length
    s, N, n1 = plan.superposition.bag_size, plan.train_iters, plan.phase1_iters
    per_position = model.training_flops_per_position()
    per_step = per_position * B * L
    total, active = model.parameters()
    phase1_text = plan.text_tokens_after(n1)
    phase2_text = plan.text_tokens_after(N) - phase1_text
    tst_text = phase1_text + phase2_text
    baseline_text = plan.baseline_text_tokens()
    gpus = recipe.parallel.num_gpus

    if tokens_per_gpu_second:
        seconds = N * B * L / (tokens_per_gpu_second * gpus)
        basis = f"measured throughput {tokens_per_gpu_second:,.0f} positions/s/GPU"
    else:
        seconds = N * per_step / (gpus * mfu * peak_tflops * 1e12)
        basis = f"MFU {mfu:.0%} of {peak_tflops:,.0f} TFLOP/s per GPU"

    corpus = corpus_tokens if corpus_tokens is not None else _corpus_tokens(recipe)
    if corpus is None:
        verdict = (f"unknown: give --corpus-tokens (or data.prefix of preprocessed data); TST "
                   f"needs {tst_text:,} unique tokens")
    elif corpus >= tst_text:
        verdict = f"enough: the corpus holds {corpus:,} tokens, TST reads {tst_text:,} (one epoch)"
    else:
        verdict = (f"data-bound: the corpus holds {corpus:,} tokens but TST reads {tst_text:,} "
                   f"({tst_text / corpus:.2f} epochs); at equal data the paper finds the baseline "
                   "wins. Add data, lower train_iters, tst.bag_size or tst.phase1_fraction")

    return {
        "recipe": recipe.name,
        "gpus": gpus,
        "nodes": recipe.parallel.nodes,
        "precision": recipe.precision.name,
        "parameters": {"total": total, "active": active},
        "seq_length": L,
        "global_batch_size": B,
        "bag_size": s,
        "phases": [
            {"phase": 1, "iterations": n1, "first": 1, "last": n1, "text_tokens": phase1_text,
             "flops": n1 * per_step},
            {"phase": 2, "iterations": N - n1, "first": n1 + 1, "last": N,
             "text_tokens": phase2_text, "flops": (N - n1) * per_step},
        ],
        "total": {"iterations": N, "text_tokens": tst_text, "flops": N * per_step},
        "baseline_equal_flops": {"iterations": N, "text_tokens": baseline_text,
                                 "flops": N * per_step},
        "text_ratio": tst_text / baseline_text,
        "flops_per_position": per_position,
        "estimate": {"gpu_hours": seconds * gpus / 3600, "wall_hours": seconds / 3600,
                     "basis": basis},
        "data": {"tst_needs_tokens": tst_text, "baseline_needs_tokens": baseline_text,
                 "corpus_tokens": corpus, "verdict": verdict},
        "megatron_args": recipe.megatron_args(),
        "recipe_config": asdict(recipe),
    }


def format_plan(report: dict) -> str:
    p1, p2 = report["phases"]
    total, base, est = report["total"], report["baseline_equal_flops"], report["estimate"]
    tot_params, act_params = report["parameters"]["total"], report["parameters"]["active"]
    lines = [
        f"recipe {report['recipe']}: {tot_params / 1e9:.2f}B parameters "
        f"({act_params / 1e9:.2f}B active), L={report['seq_length']}, global batch "
        f"{report['global_batch_size']}, s={report['bag_size']}, {report['gpus']} GPU(s) on "
        f"{report['nodes']} node(s), {report['precision']}",
        "",
        f"{'':26}{'iterations':>12}{'text tokens':>22}{'FLOPs':>14}",
        f"{'phase 1 (superposition)':26}{p1['iterations']:>12,}{p1['text_tokens']:>22,}{p1['flops']:>14.3e}",
        f"{'phase 2 (recovery)':26}{p2['iterations']:>12,}{p2['text_tokens']:>22,}{p2['flops']:>14.3e}",
        f"{'TST total':26}{total['iterations']:>12,}{total['text_tokens']:>22,}{total['flops']:>14.3e}",
        f"{'baseline, equal FLOPs':26}{base['iterations']:>12,}{base['text_tokens']:>22,}{base['flops']:>14.3e}",
        "",
        f"TST reads {report['text_ratio']:.2f}x the baseline's text (1 + (s-1) r).",
        f"estimate: {est['gpu_hours']:,.0f} GPU-hours, {est['wall_hours']:,.1f} h wall "
        f"({est['basis']})",
        f"data: {report['data']['verdict']}",
    ]
    return "\n".join(lines)
