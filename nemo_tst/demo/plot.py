"""The loss curves of runs trained side by side, as a PNG (matplotlib, when installed).

    plot_curves     the demo: held-out loss by step and by text tokens, training losses, the
                    phase switch
    plot_iso_loss   the quality benchmark: held-out loss by step, and each baseline's final
                    loss against its length beside the TST runs' final losses
"""

import sys
from pathlib import Path

__all__ = ["plot_curves", "plot_iso_loss"]


def _pyplot(tag: str, path: Path):
    """matplotlib's pyplot drawing to files, or None (and a note that `path` is skipped) when
    it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[{tag}] matplotlib is not installed: skipping {path.name}", file=sys.stderr)
        return None
    return plt


def plot_curves(runs: dict, boundary: int, path: Path) -> bool:
    """Held-out loss by step and by text tokens, training losses dotted (phase 1) and dashed;
    `boundary`: TST's last phase-1 iteration. False when matplotlib is not installed."""
    plt = _pyplot("demo", path)
    if plt is None:
        return False
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"baseline": "tab:blue", "tst": "tab:orange"}
    for name, run in runs.items():
        color = colors.get(name)
        its = sorted(run["valid"])
        losses = [run["valid"][i] for i in its]
        by_step.plot(its, losses, marker="o", markersize=3, color=color,
                     label=f"{name}: held-out next-token loss")
        by_tokens.plot([run["text_tokens_at"][i] for i in its], losses, marker="o", markersize=3,
                       color=color, label=name)
        train = run.get("train_loss", {})
        if train.get("phase1") and run["bag_size"] > 1:
            p1 = sorted(train["phase1"])
            by_step.plot(p1, [train["phase1"][i] for i in p1], color=color, linestyle=":", linewidth=1.5,
                         label=f"{name}: phase-1 training loss (multi-hot: mean CE of the next bag's "
                               f"{run['bag_size']} tokens)")
        rest = dict(train.get("phase2", {}))
        if run["bag_size"] == 1:
            rest.update(train.get("phase1", {}))
        if rest:
            p2 = sorted(rest)
            by_step.plot(p2, [rest[i] for i in p2], color=color, linestyle="--", linewidth=0.8, alpha=0.7,
                         label=f"{name}: next-token training loss")
    by_step.axvline(boundary, color="gray", linestyle="--", label="TST phase 1 -> 2")
    by_step.set(xlabel="iteration", ylabel="loss (nats)", title="vs step")
    by_tokens.set(xlabel="text tokens trained on", ylabel="held-out next-token loss (nats)",
                  title="held-out loss vs tokens")
    by_tokens.set_xscale("log")
    for ax in (by_step, by_tokens):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=7, loc="upper right")
    by_tokens.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.07 if boundary else 0, 1, 1))
    if boundary:
        fig.text(0.01, 0.01, "In phase 1 (iterations 1-%d) TST trains on bag means, not single tokens: its held-out "
                 "next-token loss stays flat until phase 2, while its phase-1 training loss (the multi-hot loss "
                 "it optimises, dotted) falls.\nThat is learning; the next-token skill follows in phase 2." % boundary,
                 ha="left", va="bottom", fontsize=8, color="dimgray")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_iso_loss(runs: dict, phase1_end: dict, points, path: Path) -> bool:
    """Left: each run's held-out loss by step, TST's phase switches dotted. Right: `points`,
    (steps, final loss) of the baselines, and each TST run's final loss as a line across."""
    plt = _pyplot("quality", path)
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, r in runs.items():
        if r["valid"]:
            its = sorted(r["valid"])
            left.plot(its, [r["valid"][i] for i in its], marker=".", label=name, color=f"C{list(runs).index(name)}")
    for name, n1 in phase1_end.items():
        left.axvline(n1, color="gray", linestyle=":", linewidth=1)
    left.set(xlabel="iteration", ylabel="held-out next-token loss (nats)", title="held-out loss")
    finals = [r["final_loss"] for r in runs.values() if r.get("final_loss") is not None]
    if finals:
        left.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    if points:
        xs, ys = zip(*sorted(points))
        right.plot(xs, ys, marker="o", color="black", label="baseline final loss vs its length")
    for i, (name, r) in enumerate(runs.items()):
        if r["bag_size"] > 1 and r.get("final_loss") is not None:
            right.axhline(r["final_loss"], linestyle="--", color=f"C{i}",
                          label=f"{name} final loss ({r['steps']} steps)")
    right.set(xlabel="baseline steps (FLOPs)", ylabel="final held-out loss (nats)", title="iso-loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
