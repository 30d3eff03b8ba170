"""Time of a TST phase-1 training step over a baseline step of the same model, L and batch.

One TSTGPTModel (megatron-core GPTModel, local spec, world size 1), one torch AdamW (fused on
CUDA). A step is forward + backward + optimizer step, timed whole:

    baseline      text [b, L+1] -> tokens/labels [b, L] -> per-token CE -> masked mean
    phase 1, s    text [b, s*L+s] -> make_superposition_batch -> bag-mean embedding of
                  [b, s*L] ids -> L latent positions -> multi-hot CE [b, L, s] ->
                  reduce_multi_hot_loss

Both run the transformer on L positions, so the FLOPs are equal but for the bag mean (s*L*d
adds) and the multi-hot loss (s gathers per position instead of one). Target: phase-1 step /
baseline step <= 1.02. The configurations are measured in interleaved rounds (baseline, s=4,
s=16, baseline, ...) so clock or thermal drift hits all alike; each number is the median over
all measured steps. Data are random token ids already on the device (the trainer's batch
arrives the same way).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

GPU = dict(layers=12, hidden=768, heads=12, ffn=2048, vocab=16384, seq=512, batch=32)
CPU = dict(layers=2, hidden=64, heads=4, ffn=172, vocab=1024, seq=64, batch=4)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(parser, default_out="benchmarks/results/step_overhead.json")
    C.add_shape_args(parser, GPU, CPU)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--precision", choices=["bf16", "autocast", "fp32"], default=None,
                        help="bf16 parameters (CUDA default), bf16 autocast, or fp32 (CPU default)")
    parser.add_argument("--attention", choices=["unfused", "sdpa"], default="unfused")
    parser.add_argument("--warmup", type=int, default=None, help="steps per config (CUDA 10, CPU 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (CUDA 6, CPU 3)")
    parser.add_argument("--steps-per-round", type=int, default=None, help="(CUDA 10, CPU 3)")
    opts = parser.parse_args(argv)
    device = C.resolve_device(opts.device)
    C.fill_defaults(opts, device, GPU, CPU)
    cuda = device.type == "cuda"
    opts.precision = opts.precision or ("bf16" if cuda else "fp32")
    opts.warmup = opts.warmup if opts.warmup is not None else (10 if cuda else 2)
    opts.rounds = opts.rounds or (6 if cuda else 3)
    opts.steps_per_round = opts.steps_per_round or (10 if cuda else 3)
    if opts.attention == "sdpa" and not C.sdpa_spec_available():
        raise SystemExit("--attention sdpa: nemo_tst.attention.get_gpt_layer_sdpa_spec is not there")

    C.init_megatron_single_process(device, opts.seed)
    from nemo_tst.superposition import (
        SuperpositionConfig,
        make_superposition_batch,
        reduce_multi_hot_loss,
        set_superposition,
    )

    model = C.build_megatron_gpt(opts, device, opts.precision, opts.attention)
    optimizer = C.make_optimizer(model, device)
    b, L, V = opts.batch, opts.seq, opts.vocab
    gen = torch.Generator(device=device).manual_seed(opts.seed)

    def baseline_step(text):
        set_superposition(model, None)
        tokens, labels = text[:, :-1], text[:, 1:]
        position_ids = torch.arange(L, device=device).unsqueeze(0).expand(b, L)
        loss_mask = torch.ones(b, L, device=device)
        with C.autocast_context(opts.precision, device):
            ce = model(tokens, position_ids, None, labels=labels)  # [b, L] fp32
        loss = (ce * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def phase1_step(text, cfg, weights):
        set_superposition(model, cfg)
        batch = make_superposition_batch(text, cfg, loss_mask=torch.ones(b, text.size(1) - 1, device=device))
        with C.autocast_context(opts.precision, device):
            per_target = model(batch.input_ids, batch.position_ids, None, labels=batch.targets)
        loss_sum, positions = reduce_multi_hot_loss(per_target, batch.target_mask, weights)
        (loss_sum / positions).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    configs = {"baseline": (lambda text: baseline_step(text), torch.randint(0, V, (b, L + 1), device=device, generator=gen))}
    for s in opts.bag_sizes:
        cfg = SuperpositionConfig(bag_size=s)
        weights = torch.tensor(cfg.weights(), device=device)
        text = torch.randint(0, V, (b, cfg.sample_length(L)), device=device, generator=gen)
        configs[f"phase 1 s={s}"] = (lambda text, cfg=cfg, w=weights: phase1_step(text, cfg, w), text)

    times = {name: [] for name in configs}
    for name, (step, text) in configs.items():
        C.time_calls(lambda: step(text), device, warmup=opts.warmup, iters=1)
    for _ in range(opts.rounds):
        for name, (step, text) in configs.items():
            times[name] += C.time_calls(lambda: step(text), device, warmup=0, iters=opts.steps_per_round)

    base = C.median(times["baseline"])
    results, rows = [], []
    for name, ts in times.items():
        s = 1 if name == "baseline" else int(name.split("=")[1])
        ms = C.median(ts)
        text_tokens = b * L * s
        r = {"config": name, "bag_size": s, "ms_median": ms, "ms_min": min(ts), "ms_all": ts,
             "ratio_vs_baseline": ms / base, "text_tokens_per_step": text_tokens,
             "text_tokens_per_s": text_tokens / (ms / 1e3)}
        results.append(r)
        rows.append([name, C.fmt(ms, ".2f"), C.fmt(min(ts), ".2f"), C.fmt(ms / base, ".3f"),
                     f"{text_tokens:,}", f"{r['text_tokens_per_s']:,.0f}"])
    env = C.environment(device)
    n = opts.rounds * opts.steps_per_round
    title = (f"phase-1 step / baseline step: {opts.layers} layers, hidden {opts.hidden}, "
             f"{opts.heads} heads, ffn {opts.ffn}, V {V}, L {L}, batch {b}, {opts.precision}, "
             f"{opts.attention} attention; median of {n} steps ({opts.rounds} interleaved rounds) "
             f"after {opts.warmup} warm-up, {env['device']}")
    md = C.print_table(title, ["step", "ms (median)", "ms (min)", "vs baseline", "text tokens/step",
                               "text tokens/s"], rows)
    for r in results[1:]:
        print(f"s={r['bag_size']}: {r['ratio_vs_baseline']:.3f}x the baseline step "
              f"(target <= 1.02: {'met' if r['ratio_vs_baseline'] <= 1.02 else 'NOT met'})")
    payload = {"benchmark": "step_overhead", "command": C.command_line(), "env": env,
               "config": {k: v for k, v in vars(opts).items() if k != "out"}, "target": 1.02,
               "results": results, "title": title, "table_md": md}
    C.write_json(opts.out, payload)
    return payload


if __name__ == "__main__":
    main()
