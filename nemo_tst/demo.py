"""`nemo-tst demo`: a baseline and a two-phase TST run at equal FLOPs per step, end to end.

1. Corpus: the Python standard library's sources installed with this interpreter, split by
   file into train / validation (present on every machine, no download).
2. A byte-level BPE trained on the training files; Megatron indexed datasets written with it.
3. Two runs of the real Megatron model, trainer, datasets and checkpoints, same model, L,
   global batch, iterations and WSD schedule:
     baseline   ordinary next-token training (`--tst-bag-size 1`: every TST code path reduces
                to standard training at s=1)
     tst        phase 1 with bags of s tokens for the first r of the steps, then recovery
4. A table, `summary.json` and `loss_curves.png` in --out.

Sizes: "ci" is a smoke test (about a minute a run), "cpu" fits in about ten minutes on two
cores, "gpu" is a larger model and many more steps. Rerunning the same command resumes: data
already prepared is reused, finished runs are skipped, unfinished ones continue.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from nemo_tst.conf import CONF_DIR, read_conf

__all__ = ["demo_main", "load_sizes", "prepare_stdlib_data", "run_demo"]

CONF = CONF_DIR / "demo.yaml"


def load_sizes(path: Path = CONF) -> dict:
    """Model and schedule per demo size, from conf/demo.yaml (data, not code)."""
    return read_conf(path)


def prepare_stdlib_data(out: Path, *, max_bytes, vocab_size: int, workers: int = 1) -> dict:
    """Corpus -> tokenizer.json -> <out>/stdlib_train, <out>/stdlib_valid. Reused if present."""
    from nemo_tst.data import HFTokenizer, build_stdlib_corpus, iter_texts, preprocess, train_bpe

    out.mkdir(parents=True, exist_ok=True)
    done = out / "data.json"
    if done.is_file():
        return json.loads(done.read_text())
    corpus = build_stdlib_corpus(out, max_bytes=max_bytes)
    tokenizer_path = out / "tokenizer.json"
    train_bpe(iter_texts(corpus.train), vocab_size=vocab_size, save_path=tokenizer_path)
    tokenizer = HFTokenizer.from_file(tokenizer_path)
    result = preprocess(
        list(corpus.train), str(out / "stdlib"), tokenizer, held_out_inputs=list(corpus.valid),
        workers=workers, overwrite=True,
    )
    info = {
        "tokenizer": str(tokenizer_path),
        "train_prefix": result.train.prefix,
        "valid_prefix": result.valid.prefix,
        "train_tokens": result.train.tokens,
        "valid_tokens": result.valid.tokens,
        "vocab_size": tokenizer.vocab_size,
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def megatron_args(size: dict, data: dict, *, cpu: bool) -> list[str]:
    """The Megatron-LM GPT arguments both runs share (Llama-style: RMSNorm, SwiGLU, RoPE)."""
    N = size["iters"]
    args = [
        "--num-layers", size["layers"], "--hidden-size", size["hidden"],
        "--num-attention-heads", size["heads"], "--ffn-hidden-size", size["ffn"],
        "--seq-length", size["seq"], "--max-position-embeddings", size["seq"],
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--micro-batch-size", size["mbs"], "--global-batch-size", size["gbs"],
        "--train-iters", N, "--lr", size["lr"], "--min-lr", size["lr"] / 10,
        "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
        "--lr-wsd-decay-iters", max(N // 10, 1), "--lr-warmup-iters", size["warmup"],
        "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--weight-decay", 0.1, "--clip-grad", 1.0,
        "--seed", 1234, "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
        "--tokenizer-type", "NullTokenizer", "--vocab-size", data["vocab_size"],
        "--tst-tokenizer", data["tokenizer"],
        "--train-data-path", data["train_prefix"], "--valid-data-path", data["valid_prefix"],
        "--test-data-path", data["valid_prefix"],
        "--eval-interval", size["eval_interval"], "--eval-iters", size["eval_iters"],
        "--log-interval", max(size["eval_interval"] // 4, 1),
        "--save-interval", size["eval_interval"] * 2, "--ckpt-format", "torch_dist",
        "--num-workers", 0,
    ]
    if cpu:
        from nemo_tst.cpu import TRAINER_CPU_ARGS

        args += TRAINER_CPU_ARGS
    else:
        args += ["--bf16", "--transformer-impl", "local", "--use-distributed-optimizer"]
    return [str(a) for a in args]


def steps_to_reach(valid: dict[int, float], target: float):
    """First evaluated iteration whose held-out loss is at or below `target` (None if never)."""
    return next((it for it in sorted(valid) if valid[it] <= target), None)


def plot_curves(runs: dict, boundary: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[demo] matplotlib is not installed: skipping loss_curves.png", file=sys.stderr)
        return False
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        its = sorted(run["valid"])
        losses = [run["valid"][i] for i in its]
        by_step.plot(its, losses, marker="o", label=name)
        by_tokens.plot([run["text_tokens_at"][i] for i in its], losses, marker="o", label=name)
    by_step.axvline(boundary, color="gray", linestyle="--", label="TST phase 1 -> 2")
    by_step.set(xlabel="iteration", ylabel="held-out next-token loss (nats)", title="vs step")
    by_tokens.set(xlabel="text tokens trained on", title="vs tokens")
    by_tokens.set_xscale("log")
    for ax in (by_step, by_tokens):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(out: Path, *, size_name: str, bag_size: int, phase1_fraction: float, nproc: int = 1) -> dict:
    import torch

    from nemo_tst.training.arguments import TSTPlan
    from nemo_tst.training.driver import run
    from nemo_tst.training.logs import parse_training_log

    size = load_sizes()[size_name]
    cpu = not torch.cuda.is_available()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_stdlib_data(out / "data", max_bytes=size["corpus_bytes"], vocab_size=size["vocab"])
    print(f"[demo] data: {data['train_tokens']:,} train / {data['valid_tokens']:,} held-out tokens "
          f"({time.time() - t0:.0f}s)", flush=True)
    common = megatron_args(size, data, cpu=cpu)

    runs = {}
    for name, s in (("baseline", 1), ("tst", bag_size)):
        argv = common + ["--tst-bag-size", str(s), "--tst-phase1-fraction", str(phase1_fraction),
                         "--save", str(out / name)]
        log_file = out / f"{name}.log"
        start = time.time()
        print(f"[demo] {name}: s={s}, log in {log_file}", flush=True)
        plan: TSTPlan = run(argv, nproc=nproc, log_file=log_file)
        wall = time.time() - start
        log = parse_training_log(log_file.read_text())
        if not log.valid:
            raise RuntimeError(f"no validation loss found in {log_file}")
        final_it = max(log.valid)
        runs[name] = {
            "bag_size": s,
            "phase1_iters": plan.phase1_iters if s > 1 else 0,
            "valid": log.valid,
            "final_valid_loss": log.valid[final_it],
            "text_tokens": plan.text_tokens_after(plan.train_iters),
            "text_tokens_at": {it: plan.text_tokens_after(it) for it in log.valid},
            "wall_seconds": round(wall, 1),
        }

    base, tst = runs["baseline"], runs["tst"]
    summary = {
        "size": size_name,
        "device": "cuda" if not cpu else "cpu",
        "iterations": size["iters"],
        "seq_length": size["seq"],
        "global_batch_size": size["gbs"],
        "bag_size": bag_size,
        "phase1_fraction": phase1_fraction,
        "runs": runs,
        "tst_minus_baseline": tst["final_valid_loss"] - base["final_valid_loss"],
        "tst_steps_to_baseline_final_loss": steps_to_reach(tst["valid"], base["final_valid_loss"]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plotted = plot_curves(runs, tst["phase1_iters"], out / "loss_curves.png")

    print()
    print(f"{'run':10} {'final held-out loss':>20} {'text tokens':>14} {'wall time':>10}")
    for name, r in runs.items():
        print(f"{name:10} {r['final_valid_loss']:>20.4f} {r['text_tokens']:>14,} "
              f"{r['wall_seconds']:>9.0f}s")
    reach = summary["tst_steps_to_baseline_final_loss"]
    print(f"TST - baseline: {summary['tst_minus_baseline']:+.4f} nats; TST reaches the baseline's "
          f"final loss at step {reach if reach is not None else 'never (within this run)'} of "
          f"{size['iters']}")
    print(f"wrote {out / 'summary.json'}" + (f" and {out / 'loss_curves.png'}" if plotted else ""))
    return summary


def demo_main(argv: list[str]) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="nemo-tst demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--size", choices=["auto", *load_sizes()], default="auto",
                        help="auto: gpu when CUDA is available, else cpu")
    parser.add_argument("--bag-size", type=int, default=4, help="s of the TST run")
    parser.add_argument("--phase1-fraction", type=float, default=0.3, help="r of the TST run")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    opts = parser.parse_args(argv)
    size = opts.size if opts.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    run_demo(opts.out, size_name=size, bag_size=opts.bag_size,
             phase1_fraction=opts.phase1_fraction, nproc=opts.nproc_per_node)
