"""`nemo-tst demo` at its reduced CI size: real data, trainer and checkpoints, both runs."""

import json
import math

from nemo_tst.cli import main


def test_demo_ci_size_runs_baseline_and_tst(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "ci", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "final held-out loss" in printed and "TST - baseline" in printed

    summary = json.loads((out / "summary.json").read_text())
    base, tst = summary["runs"]["baseline"], summary["runs"]["tst"]
    assert math.isfinite(base["final_valid_loss"]) and math.isfinite(tst["final_valid_loss"])
    assert summary["recipe"] == "tst_tiny"  # the ci size is that recipe (conf/demo.yaml)
    assert base["bag_size"] == 1 and tst["bag_size"] == 4
    assert tst["phase1_iters"] == round(0.3 * summary["iterations"])
    # Equal steps, L and batch; phase 1 reads s times the text per step.
    n1, N = tst["phase1_iters"], summary["iterations"]
    per_step = summary["seq_length"] * summary["global_batch_size"]
    assert base["text_tokens"] == N * per_step
    assert tst["text_tokens"] == n1 * 4 * per_step + (N - n1) * per_step
    assert (out / "loss_curves.png").stat().st_size > 10_000

    # The baseline is one launch, the TST run two; side by side on CPU, one thread each.
    assert (out / "baseline.log").read_text().count("[nemo-tst] phase") == 1
    assert (out / "tst.log").read_text().count("[nemo-tst] phase") == 2
    assert summary["side_by_side"] is True
    # The terminal: the demo's lines and the progress lines, none of Megatron's own output.
    assert "[demo] baseline step    30/30 | loss" in printed and "[demo] tst      step    30/30 phase 2" in printed
    for megatron_noise in ("---- arguments ----", "UserWarning", "Apex", "DEPRECATED", "WARNING",
                           "consumed samples", "[nemo-tst] phase"):
        assert megatron_noise not in printed + captured.err, megatron_noise
    assert "------------------------ arguments ------------------------" in (out / "tst.log").read_text()
    # The verdict, and the training curves behind the plot: TST's phase-1 multi-hot loss too.
    assert summary["verdict"] in printed
    assert ("ABOVE the baseline" in printed) == (summary["tst_minus_baseline"] > 0)
    assert sorted(map(int, tst["train_loss"]["phase1"])) and max(map(int, tst["train_loss"]["phase1"])) <= n1
    assert min(map(int, tst["train_loss"]["phase2"])) > n1
    assert all(math.isfinite(v) and v > 0 for v in base["train_loss"]["phase2"].values())

    # The same command again resumes: both runs are complete, nothing is retrained.
    assert main(["demo", "--size", "ci", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"]["tst"]["final_valid_loss"] == tst["final_valid_loss"]
    assert capsys.readouterr().out.count("complete (reused)") == 2


def test_demo_export_hf_writes_both_models(tmp_path):
    """`--export-hf` after the runs: both final models as Hugging Face checkpoints (the runs of
    an earlier call are reused, so this costs the export only when run after a demo)."""
    out = tmp_path / "demo"
    assert main(["demo", "--size", "ci", "--out", str(out), "--export-hf"]) == 0
    for name in ("baseline", "tst"):
        hf = out / "hf" / name
        config = json.loads((hf / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (hf / "tokenizer.json").is_file() and any(hf.glob("model*.safetensors"))
