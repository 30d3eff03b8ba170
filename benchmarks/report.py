"""Combine the benchmarks' JSON files into one markdown report.

    python benchmarks/report.py DIR [DIR ...] --out results.md [--command "..."]

Each DIR may hold loss_microbench.json, step_overhead.json, throughput.json, quality.json (a
later DIR's file replaces an earlier one's); the device, versions and commit come from the files.
"""

import argparse
import json
import sys
from pathlib import Path

ORDER = ["loss_microbench", "step_overhead", "throughput", "quality"]
HEADINGS = {
    "loss_microbench": "Multi-hot loss vs one cross-entropy (targets: time <= 1.2x, memory <= 1.05x)",
    "step_overhead": "Phase-1 step vs baseline step (target <= 1.02x)",
    "throughput": "Baseline throughput: Megatron model path vs plain PyTorch",
    "quality": "Quality at equal FLOPs over seeds (a difference counts when its 95% interval excludes 0)",
}


def verdict_lines(name: str, data: dict) -> list[str]:
    lines = []
    if name == "loss_microbench":
        for v in data.get("verdicts", []):
            r = next(r for r in data["results"] if r["case"] == "multi-hot (ours)"
                     and r["vocab"] == v["vocab"] and r["bag_size"] == v["bag_size"])
            mem = r.get("memory_vs_one_ce")
            lines.append(f"- V={v['vocab']}, s={v['bag_size']}: time {r.get('time_vs_one_ce', float('nan')):.2f}x "
                         f"({'met' if v['time_ok'] else 'NOT met'}), peak memory "
                         + ("-" if mem is None else f"{mem:.2f}x ({'met' if v['memory_ok'] else 'NOT met'})"))
    elif name == "step_overhead":
        for r in data["results"][1:]:
            lines.append(f"- s={r['bag_size']}: {r['ratio_vs_baseline']:.3f}x "
                         f"({'met' if r['ratio_vs_baseline'] <= data['target'] else 'NOT met'})")
    elif name == "throughput":
        lines.append(f"- FLOPs per step: {data['flops_formula']} = {data['flops_per_step'] / 1e12:.3g} TFLOP; "
                     f"MFU against {data['config']['peak_tflops']:g} TFLOP/s; a large matmul reached "
                     f"{data['matmul_ceiling_tflops']:.3g} TFLOP/s on this device")
        lines += [f"- skipped {s}" for s in data.get("skipped", [])]
    elif name == "quality":
        for run, row in data.get("over_seeds", {}).items():
            d, sp = row.get("minus_baseline"), row.get("iso_loss_speedup")
            if d is None:
                lines.append(f"- {run}: {row['seeds']} finished seed(s), too few for an interval")
                continue
            speed = ("not measured" if sp is None
                     else f"{sp['mean']:.2f}x, 95% interval [{sp['low']:.2f}, {sp['high']:.2f}]")
            lines.append(f"- {run}: TST - baseline = {d['mean']:+.4f} nats (sd {d['sd']:.4f}, 95% interval "
                         f"[{d['low']:+.4f}, {d['high']:+.4f}], {d['n']} seeds): {row['verdict']}; "
                         f"iso-loss speedup {speed}")
        for seed, runs in data.get("runs", {}).items():
            for run, r in runs.items():
                if not r["status"].startswith("done"):
                    lines.append(f"- {run}, seed {seed}: {r['status']}")
        data_info = data.get("data", {})
        if data_info:
            lines.append(f"- data: {data_info.get('train_tokens', 0):,} train / "
                         f"{data_info.get('valid_tokens', 0):,} held-out tokens, BPE {data_info.get('vocab_size')}, "
                         f"{data_info.get('files')} unique source files")
        cal = data.get("calibration")
        if cal:
            lines.append(f"- N chosen by calibration: {cal['ms_per_iteration']:.1f} ms/iteration with "
                         f"{cal['slots']} runs sharing the device")
        if data.get("plot"):
            lines.append(f"\n![loss curves]({Path(data['plot']).name})")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default=None, help="the command that produced the results")
    opts = parser.parse_args(argv)
    found = {}
    for d in opts.dirs:
        for name in ORDER:
            path = d / f"{name}.json"
            if path.is_file():
                found[name] = json.loads(path.read_text())
    if not found:
        sys.exit(f"no benchmark JSON in {', '.join(map(str, opts.dirs))}")
    envs = {json.dumps([v["env"].get(k) for k in ("device", "torch", "megatron_core", "git_commit")])
            for v in found.values()}
    first = next(iter(found.values()))["env"]
    out = ["# nemo-tst benchmarks", ""]
    if opts.command:
        out += [f"Command: `{opts.command}`", ""]
    out += [f"- device: {first['device']}", f"- torch {first['torch']} (CUDA {first['cuda']}), "
            f"megatron-core {first['megatron_core']}, Python {first['python']}",
            f"- git commit: {first['git_commit']}", f"- run at: {first['time']} on {first['host']}"]
    if first["device"].startswith("CPU"):
        out.append("- CPU run: tiny sizes on a shared CPU check that the benchmarks run; the "
                   "numbers and the target verdicts mean nothing here (they are for the GPU run)")
    if len(envs) > 1:
        out.append("- NOTE: the files below come from different devices, versions or commits; "
                   "each section names its own")
    for name in ORDER:
        if name not in found:
            out += ["", f"## {HEADINGS[name]}", "", "not run (or timed out before writing its results)"]
            continue
        data = found[name]
        out += ["", f"## {HEADINGS[name]}", "", f"`{data['command']}`", "", data["title"], "",
                data["table_md"], ""]
        out += verdict_lines(name, data)
        if len(envs) > 1:
            e = data["env"]
            out.append(f"- measured on {e['device']}, torch {e['torch']}, megatron-core "
                       f"{e['megatron_core']}, commit {e['git_commit']}")
    opts.out.write_text("\n".join(out) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
