"""Forward + backward of the phase-1 multi-hot loss against one ordinary cross-entropy.

For logits z [L, b, V] (bf16, L*b = --tokens) and targets y [L, b, s], each case computes a
scalar loss and its gradient with respect to z:

    one CE (Megatron)   mean over positions of vocab_parallel_cross_entropy(z, y[..., 0])
    one CE (torch)      F.cross_entropy(z.float(), y[..., 0])   (what bf16 autocast runs)
    multi-hot (ours)    mean of multi_hot_cross_entropy(z, y)   = mean_j CE(z, y_j), one pass
    naive (Megatron)    (1/s) sum_j vocab_parallel_cross_entropy(z, y_j): s calls
    naive (torch)       (1/s) sum_j F.cross_entropy(z.float(), y_j):      s calls

The multi-hot loss shares one logsumexp: CE_j = logsumexp(z) - z[y_j], so it should cost about
one CE, whatever s is. Targets: time / one CE (Megatron) <= 1.2 and peak memory / one CE <= 1.05.

Reported per case: median milliseconds of forward + backward (CUDA events; perf_counter on
CPU), peak memory above what was allocated before the call (`torch.cuda.max_memory_allocated`,
reset between cases; the bf16 gradient of z, the same in every case, is included; on CPU, where
no allocator reports a peak, the live bytes of every tensor the ops create are tracked instead),
and the bytes autograd saved for backward (storages counted once). Megatron's CE is called with the tensor-parallel group of a one-rank world, as
the model does at TP=1; ours gets tp_group=None (at TP=1 it issues no collective either way).

fp32 logits (--dtype fp32): Megatron's vocab_parallel_cross_entropy works in place on its input
once it is fp32 (its `.float()` is then a no-op: it overwrites the logits with the softmax in
forward, saves that for backward and turns it into the gradient there), so a second call on the
same logits fails in backward and every later case would see destroyed logits. Each Megatron
call therefore gets its own copy, `z.clone()` (s copies in the naive baseline); with bf16 logits
the `.float()` upcast inside the call makes that copy anyway. The Megatron rows' memory includes
those copies, and the table says so.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import weakref  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

GPU_DEFAULTS = dict(tokens=8192, vocab=[32768, 131072], bag_sizes=[4, 16], warmup=5, iters=30)
CPU_DEFAULTS = dict(tokens=256, vocab=[2048, 8192], bag_sizes=[4, 16], warmup=3, iters=15)


def saved_bytes(fn, exclude: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during fn() (each storage once; the
    input `exclude` is not counted: it exists anyway)."""
    seen, total = {exclude.untyped_storage().data_ptr()}, 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return total


class TrackedPeak(TorchDispatchMode):
    """Peak live bytes of the tensors that ops create while active (each storage once, freed
    when its last tracked tensor dies): the allocator's peak without an allocator that reports
    one, i.e. on CPU. Backward runs on the calling thread for CPU tensors, so it is tracked."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = {}  # data_ptr -> [bytes, tracked tensors alive]

    def _release(self, key):
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key not in self.storages:
                    self.storages[key] = [t.untyped_storage().nbytes(), 0]
                    self.live += self.storages[key][0]
                    self.peak = max(self.peak, self.live)
                self.storages[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_extra_bytes(step, logits, device) -> int:
    """Peak memory of one forward + backward above what was allocated before it (the bf16
    gradient of the logits, allocated by every case, included)."""
    logits.grad = None
    if device.type != "cuda":
        with TrackedPeak() as tracked:
            step()
        return tracked.peak
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def megatron_ce(z, y, tp_group):
    """Mean of Megatron's vocab_parallel_cross_entropy(z, y) over positions (y [L, b]). It
    works in place on fp32 input, so fp32 logits are cloned first: every call gets its own
    copy, as the `.float()` upcast inside the call gives bf16 logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if z.dtype == torch.float32:
        z = z.clone()
    return vocab_parallel_cross_entropy(z, y, 0.0, tp_group).mean()


def torch_ce(z, y):
    return F.cross_entropy(z.float().view(-1, z.size(-1)), y.reshape(-1))


def loss_cases(tp_group, *, naive: bool = True) -> tuple[dict, dict]:
    """({name: fn(z, y)} measured once per V, {name: fn(z, y)} measured per s); y [L, b, s]."""
    from nemo_tst.superposition.loss import multi_hot_cross_entropy

    cases_one = {"one CE (Megatron)": lambda z, y: megatron_ce(z, y[..., 0], tp_group),
                 "one CE (torch)": lambda z, y: torch_ce(z, y[..., 0])}
    cases_s = {"multi-hot (ours)": lambda z, y: multi_hot_cross_entropy(z, y, None, check_targets=False).mean()}
    if naive:
        cases_s["naive s x CE (Megatron)"] = lambda z, y: sum(
            megatron_ce(z, y[..., j], tp_group) for j in range(y.size(-1))) / y.size(-1)
        cases_s["naive s x CE (torch)"] = lambda z, y: (lambda zf: sum(
            torch_ce(zf, y[..., j]) for j in range(y.size(-1))) / y.size(-1))(z.float())
    return cases_one, cases_s


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(parser, default_out="benchmarks/results/loss_microbench.json")
    parser.add_argument("--tokens", type=int, help="L*b positions (GPU default 8192, CPU 256)")
    parser.add_argument("--vocab", type=int, nargs="+", help="V values (GPU: 32768 131072)")
    parser.add_argument("--bag-sizes", type=int, nargs="+", help="s values (default 4 16)")
    parser.add_argument("--batch", type=int, default=4, help="b; L = tokens / b")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-naive", action="store_true", help="skip the s-call baselines")
    opts = parser.parse_args(argv)
    device = C.resolve_device(opts.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    torch.manual_seed(opts.seed)
    C.init_megatron_single_process(device, opts.seed)

    from megatron.core import parallel_state

    from nemo_tst.superposition.loss import multi_hot_cross_entropy

    tp_group = parallel_state.get_tensor_model_parallel_group()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.dtype]
    b = opts.batch
    L = opts.tokens // b
    if L * b != opts.tokens:
        raise SystemExit(f"--tokens {opts.tokens} must be a multiple of --batch {b}")

    cases_one, cases_s = loss_cases(tp_group, naive=not opts.no_naive)

    results, checks = [], []
    for V in opts.vocab:
        logits = (3 * torch.randn(L, b, V, device=device)).to(dtype).requires_grad_()
        for s in opts.bag_sizes:
            targets = torch.randint(0, V, (L, b, s), device=device)
            cases = dict(cases_one) if s == opts.bag_sizes[0] else {}
            cases.update(cases_s)
            for name, fn in cases.items():
                def step(fn=fn):
                    fn(logits, targets).backward()

                def clear():
                    logits.grad = None

                row = {"vocab": V, "bag_size": s if name not in cases_one else None, "case": name,
                       "tokens": opts.tokens}
                try:
                    row["saved_bytes"] = saved_bytes(lambda: fn(logits, targets), logits)
                    row["peak_bytes"] = peak_extra_bytes(step, logits, device)
                    times = C.time_calls(step, device, warmup=opts.warmup, iters=opts.iters, before=clear)
                    row["ms"] = C.median(times)
                    row["ms_all"] = times
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    logits.grad = None
                    torch.cuda.empty_cache()
                logits.grad = None
                results.append(row)
            # Sanity: the one-pass loss equals the mean of s ordinary CEs (values, not timing).
            with torch.no_grad():
                ours = multi_hot_cross_entropy(logits, targets, None).mean().item()
                ref = sum(torch_ce(logits, targets[..., j]).item() for j in range(s)) / s
            checks.append({"vocab": V, "bag_size": s, "multi_hot": ours, "mean_of_s_torch_ce": ref,
                           "abs_diff": abs(ours - ref)})
        logits = None  # rebound, not deleted: the closures above refer to the name
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Ratios against one ordinary CE (Megatron's, the one the trainer uses) at the same V.
    one = {(r["vocab"], r["case"]): r for r in results if r["bag_size"] is None}
    # fp32: each Megatron call gets its own clone of the logits (see megatron_ce); say so.
    copies = dtype == torch.float32
    copies_note = ("* fp32 logits: Megatron's vocab_parallel_cross_entropy overwrites fp32 input in place "
                   "(softmax in forward, gradient in backward), so each of its calls gets its own copy "
                   "(z.clone()); these rows' time and memory include those copies: one for one CE, s for "
                   "the naive baseline (with bf16 logits the .float() upcast inside each call makes the same "
                   "fp32 copy)") if copies else None
    table = []
    for r in results:
        ref = one.get((r["vocab"], "one CE (Megatron)"), {})
        if "ms" in r and "ms" in ref:
            r["time_vs_one_ce"] = r["ms"] / ref["ms"]
        if r.get("peak_bytes") and ref.get("peak_bytes"):
            r["memory_vs_one_ce"] = r["peak_bytes"] / ref["peak_bytes"]
        if ref.get("saved_bytes"):
            r["saved_vs_one_ce"] = r["saved_bytes"] / ref["saved_bytes"]
        mib = lambda x: None if x is None else x / 2**20  # noqa: E731
        table.append([
            r["vocab"], r["bag_size"] or "-", r["case"] + (" *" if copies and "Megatron" in r["case"] else ""),
            C.fmt(r.get("ms")) if "ms" in r else r.get("error"),
            C.fmt(r.get("time_vs_one_ce"), ".2f"), C.fmt(mib(r.get("peak_bytes")), ".1f"),
            C.fmt(r.get("memory_vs_one_ce"), ".2f"), C.fmt(mib(r.get("saved_bytes")), ".1f"),
            C.fmt(r.get("saved_vs_one_ce"), ".2f"),
        ])

    env = C.environment(device)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "tracked tensor bytes"
    title = (f"multi-hot CE vs one CE: {opts.tokens} positions (L={L}, b={b}), {opts.dtype} logits, "
             f"median of {opts.iters} fwd+bwd after {opts.warmup} warm-up, peak memory from {how}, "
             f"{env['device']}")
    md = C.print_table(title, ["V", "s", "case", "ms", "time/1CE", "peak MiB", "mem/1CE",
                               "saved MiB", "saved/1CE"], table)
    if copies_note:
        print(copies_note)
        md += "\n\n" + copies_note
    targets = {"time_vs_one_ce": 1.2, "memory_vs_one_ce": 1.05}
    verdicts = []
    for r in results:
        if r["case"] == "multi-hot (ours)":
            ok_t = r.get("time_vs_one_ce") is not None and r["time_vs_one_ce"] <= targets["time_vs_one_ce"]
            ok_m = r.get("memory_vs_one_ce")
            ok_m = None if ok_m is None else ok_m <= targets["memory_vs_one_ce"]
            verdicts.append({"vocab": r["vocab"], "bag_size": r["bag_size"], "time_ok": ok_t, "memory_ok": ok_m})
            print(f"V={r['vocab']} s={r['bag_size']}: time/1CE {C.fmt(r.get('time_vs_one_ce'), '.2f')} "
                  f"(target <= 1.2: {'met' if ok_t else 'NOT met'}), peak memory/1CE "
                  f"{C.fmt(r.get('memory_vs_one_ce'), '.2f')} (target <= 1.05: "
                  f"{'-' if ok_m is None else 'met' if ok_m else 'NOT met'})")
    worst = max(c["abs_diff"] for c in checks)
    print(f"check: |multi-hot - mean of s torch CEs| <= {worst:.2e} nats over all (V, s)")
    payload = {"benchmark": "loss_microbench", "command": C.command_line(), "env": env,
               "config": {k: v for k, v in vars(opts).items() if k != "out"} | {"L": L},
               "targets": targets, "results": results, "verdicts": verdicts, "checks": checks,
               "megatron_logits_copied_per_call": copies, "note": copies_note,
               "title": title, "table_md": md}
    C.write_json(opts.out, payload)
    return payload


if __name__ == "__main__":
    main()
