"""`nemo-tst demo`: a baseline and a two-phase TST run at equal FLOPs per step, end to end.

1. Corpus: the Python standard library's sources installed with this interpreter, split by
   file into train / validation (present on every machine, no download).
2. A byte-level BPE trained on the training files; Megatron indexed datasets written with it.
3. Two runs of the real Megatron model, trainer, datasets and checkpoints, same model, L,
   global batch, iterations and WSD schedule:
     baseline   ordinary next-token training (`--tst-bag-size 1`: every TST code path reduces
                to standard training at s=1), one launch
     tst        phase 1 with bags of s tokens for the first r of the steps, then recovery
   On CPU the two run side by side, one thread each (conf/demo.yaml `side_by_side`): on two
   cores that trains more steps a minute than one run after the other on two threads, and the
   comparison stays fair (same model, data, steps and schedule; only the wall clock is shared).
4. A table with the verdict, `summary.json` and `loss_curves.png` in --out.

The terminal shows the demo's own lines and one live progress line per run (step, training
loss, held-out loss, ETA); everything the trainer prints (Megatron's argument dump, warnings,
every rank) goes to the run's log file, --out/<run>.log.

Sizes (conf/demo.yaml, each a recipe): "ci" (recipe tst_tiny) is a smoke test (about a minute),
"cpu" (tst_demo_cpu) fits in ten minutes on two cores, "gpu" (tst_demo_gpu) is a larger model and
many more steps. Both runs get the recipe's Megatron arguments (`run_argvs`). Rerunning the
same command resumes: data already prepared is reused, finished runs are skipped, unfinished
ones continue.

The package, each part usable on its own (benchmarks/quality.py uses the first five):
    data      corpus -> BPE -> Megatron indexed datasets, and the recipe overrides that read them
    runs      runs trained side by side through `nemo-tst pretrain`'s driver
    progress  the live line per run
    results   a run's curves and text tokens from its log and arguments
    plot      the loss curves as a PNG
    report    the verdict and the closing table
    stats     seed statistics: paired differences, iso-loss speedups, their intervals
    compare   the demo's two runs of one size, end to end
    cli       `nemo-tst demo`'s options
"""

from nemo_tst.demo.cli import check_demo_settings, demo_main
from nemo_tst.demo.compare import load_sizes, run_argvs, run_demo, run_overrides, size_recipe
from nemo_tst.demo.data import prepare_stdlib_data
from nemo_tst.demo.progress import Progress
from nemo_tst.demo.report import SCALE_VERDICT, verdict

__all__ = [
    "SCALE_VERDICT", "Progress", "check_demo_settings", "demo_main", "load_sizes", "prepare_stdlib_data",
    "run_argvs", "run_demo", "run_overrides", "size_recipe", "verdict",
]
