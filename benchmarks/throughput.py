"""Training throughput of the baseline: our Megatron model path vs a plain PyTorch GPT.

Same shape, same data, same optimizer (torch AdamW, fused on CUDA), a step = forward +
backward + optimizer step on one micro-batch of b x L tokens:

    megatron/unfused  TSTGPTModel (megatron-core GPTModel) with the local spec: the trainer's
                      --transformer-impl local model, softmax attention materialising L x L
    megatron/sdpa     the same with nemo_tst.attention.get_gpt_layer_sdpa_spec (if present)
    pytorch/sdpa      a plain PyTorch GPT written below: RMSNorm, SwiGLU, RoPE,
                      F.scaled_dot_product_attention(is_causal=True), untied head

each in two precisions: 'bf16' (bf16 parameters, what the trainer computes in under --bf16) and
'autocast' (fp32 parameters, torch.autocast bf16).

tokens/s = b*L / step time. Model FLOPs per step (no recomputation counted):

    6 * N * b*L  +  6 * layers * L * d * b*L

N = layers*(4*d^2 + 3*d*ffn) + d*V, the weights that multiply each token (input embedding is a
lookup); the second term is causal attention (QK^T and AV, 2*L*d each per token and layer over
the full matrix, half of it under the mask, x3 for backward). MFU = FLOPs per step / step time /
peak, with peak = --peak-tflops (989 TFLOP/s: H100 SXM dense bf16 datasheet). A large bf16
matmul is timed too, as the ceiling actually reachable on this card.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GPU = dict(layers=12, hidden=768, heads=12, ffn=2048, vocab=16384, seq=512, batch=32)
CPU = dict(layers=2, hidden=64, heads=4, ffn=172, vocab=1024, seq=64, batch=4)


# ----- the plain PyTorch GPT -------------------------------------------------------------------


def rope_tables(seq: int, head_dim: int, device, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq, device=device).float(), inv_freq)  # [L, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout, as Megatron's default
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):  # x [b, h, L, hd]
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-b, a], dim=-1) * sin.to(x.dtype)


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):  # x [b, L, d]
        b, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, h, L, hd]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, L, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(self, opts):
        super().__init__()
        self.embed = nn.Embedding(opts.vocab, opts.hidden)
        self.blocks = nn.ModuleList(Block(opts.hidden, opts.heads, opts.ffn) for _ in range(opts.layers))
        self.norm = nn.RMSNorm(opts.hidden, eps=1e-5)
        self.head = nn.Linear(opts.hidden, opts.vocab, bias=False)
        cos, sin = rope_tables(opts.seq, opts.hidden // opts.heads, None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))


# ----- measurement -----------------------------------------------------------------------------


def measure(impl: str, precision: str, opts, device) -> dict:
    b, L = opts.batch, opts.seq
    torch.manual_seed(opts.seed)
    if impl.startswith("megatron"):
        from nemo_tst.superposition import set_superposition

        model = C.build_megatron_gpt(opts, device, precision, impl.split("/")[1])
        set_superposition(model, None)
        position_ids = torch.arange(L, device=device).unsqueeze(0).expand(b, L)

        def loss_of(tokens, labels):
            return model(tokens, position_ids, None, labels=labels).mean()
    else:
        model = PlainGPT(opts).to(device)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        model.train()

        def loss_of(tokens, labels):
            return model(tokens, labels)

    optimizer = C.make_optimizer(model, device)
    params = sum(p.numel() for p in model.parameters())
    text = torch.randint(0, opts.vocab, (b, L + 1), device=device)
    tokens, labels = text[:, :-1], text[:, 1:]

    def step():
        with C.autocast_context(precision, device):
            loss = loss_of(tokens, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = C.time_calls(step, device, warmup=opts.warmup, iters=opts.iters)
    ms = C.median(times)
    flops = C.train_flops_per_step(opts)
    row = {"impl": impl, "precision": precision, "params": params, "ms_median": ms,
           "ms_all": times, "tokens_per_s": b * L / (ms / 1e3),
           "model_tflops_per_s": flops / (ms / 1e3) / 1e12}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["mfu"] = row["model_tflops_per_s"] / opts.peak_tflops
    model = optimizer = None  # rebound, not deleted: step() and loss_of() refer to the names
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def matmul_ceiling(device, n: int, iters: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul on random data (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = C.median(C.time_calls(lambda: a @ b, device, warmup=3, iters=iters))
    return 2 * n**3 / (ms / 1e3) / 1e12


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(parser, default_out="benchmarks/results/throughput.json")
    C.add_shape_args(parser, GPU, CPU)
    parser.add_argument("--attention", choices=["unfused", "sdpa", "both"], default="both",
                        help="Megatron attention path(s); 'sdpa' needs nemo_tst.attention")
    parser.add_argument("--precision", choices=["bf16", "autocast", "both"], default=None,
                        help="CUDA default both; CPU default autocast is replaced by fp32")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch GPT")
    parser.add_argument("--warmup", type=int, default=None, help="CUDA 10, CPU 2")
    parser.add_argument("--iters", type=int, default=None, help="CUDA 30, CPU 5")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak for MFU (H100 SXM datasheet: 989)")
    opts = parser.parse_args(argv)
    device = C.resolve_device(opts.device)
    C.fill_defaults(opts, device, GPU, CPU)
    cuda = device.type == "cuda"
    opts.warmup = opts.warmup if opts.warmup is not None else (10 if cuda else 2)
    opts.iters = opts.iters or (30 if cuda else 5)
    precisions = {"both": ["bf16", "autocast"], None: ["bf16", "autocast"] if cuda else ["fp32"]}.get(
        opts.precision, [opts.precision])
    attentions = ["unfused", "sdpa"] if opts.attention == "both" else [opts.attention]
    skipped = []
    if "sdpa" in attentions and not C.sdpa_spec_available():
        attentions.remove("sdpa")
        skipped.append("megatron/sdpa: nemo_tst.attention.get_gpt_layer_sdpa_spec not found")
    C.init_megatron_single_process(device, opts.seed)

    impls = [f"megatron/{a}" for a in attentions] + ([] if opts.no_plain else ["pytorch/sdpa"])
    results = []
    for impl in impls:
        for precision in precisions:
            try:
                results.append(measure(impl, precision, opts, device))
            except Exception as err:  # noqa: BLE001 - one failing path must not hide the others
                results.append({"impl": impl, "precision": precision, "error": f"{type(err).__name__}: {err}"})
                print(f"[throughput] {impl} {precision} failed: {err}", file=sys.stderr)
                if cuda:
                    torch.cuda.empty_cache()
    ceiling = matmul_ceiling(device, 8192 if cuda else 512)

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["impl"], r["precision"], "-", "-", "-", "-", "-", r["error"][:60]])
            continue
        rows.append([r["impl"], r["precision"], f"{r['params'] / 1e6:.1f}M", C.fmt(r["ms_median"], ".2f"),
                     f"{r['tokens_per_s']:,.0f}", C.fmt(r["model_tflops_per_s"], ".3g"),
                     C.fmt(r.get("mfu"), ".1%") if r.get("mfu") is not None else "-",
                     C.fmt(r.get("peak_memory_gib"), ".1f")])
    env = C.environment(device)
    flops = C.train_flops_per_step(opts)
    title = (f"baseline training throughput: {opts.layers} layers, hidden {opts.hidden}, "
             f"{opts.heads} heads, ffn {opts.ffn}, V {opts.vocab}, L {opts.seq}, micro-batch "
             f"{opts.batch} ({opts.batch * opts.seq:,} tokens/step, {flops / 1e12:.3g} model "
             f"TFLOP/step); median of {opts.iters} steps after {opts.warmup} warm-up; MFU vs "
             f"{opts.peak_tflops:g} TFLOP/s; {env['device']}")
    md = C.print_table(title, ["model", "precision", "params", "ms/step", "tokens/s", "TFLOP/s",
                               "MFU", "peak GiB"], rows)
    kind = "bf16" if cuda else "fp32"
    print(f"{kind} {8192 if cuda else 512}^3 matmul on this device: {ceiling:.0f} TFLOP/s "
          f"({ceiling / opts.peak_tflops:.0%} of {opts.peak_tflops:g})" if cuda else
          f"fp32 512^3 matmul on this CPU: {ceiling * 1e3:.1f} GFLOP/s")
    by = {(r["impl"], r["precision"]): r for r in results if "error" not in r}
    for precision in precisions:
        plain = by.get(("pytorch/sdpa", precision))
        for a in attentions:
            ours = by.get((f"megatron/{a}", precision))
            if plain and ours:
                print(f"{precision}: megatron/{a} runs at {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x "
                      f"the plain PyTorch GPT's tokens/s")
    for note in skipped:
        print(f"skipped {note}")
    payload = {"benchmark": "throughput", "command": C.command_line(), "env": env,
               "config": {k: v for k, v in vars(opts).items() if k != "out"},
               "flops_per_step": flops, "flops_formula": "6*N*b*L + 6*layers*L*d*b*L, "
               "N = layers*(4*d^2 + 3*d*ffn) + d*V", "matmul_ceiling_tflops": ceiling,
               "results": results, "skipped": skipped, "title": title, "table_md": md}
    C.write_json(opts.out, payload)
    return payload


if __name__ == "__main__":
    main()
