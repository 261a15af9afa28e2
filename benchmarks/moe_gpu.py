"""MoE on one GPU, in one process (expert-parallel size 1):

1. Grouped GEMM: the dropless experts' two products (Linear-activation-Linear, forward and backward)
   through Zeal's grouped autograd function (torch._grouped_mm) against a loop of per-expert
   matmuls, in TFLOP/s, for a few expert shapes (few large experts, many small ones).
2. The MoE layer forward + backward: tokens/s and peak device memory for Zeal's capacity dispatch,
   Zeal dropless (grouped GEMM and per-expert loop) and DeepSpeed's MoE (capacity and
   drop_tokens=False) on the same weights and tokens, where DeepSpeed is importable.
3. Whether torch's grouped GEMM takes row counts that are no multiple of 16 bytes (Zeal then falls
   back to the loop: sharded_moe._grouped_layout).

    python3 benchmarks/moe_gpu.py --out out/bench/moe_gpu.json
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import print_table, write_json  # noqa: E402


DEVICE = "cuda"  # --device cpu --small: a smoke run of this script where there is no GPU


def cuda_time(fn, iters, warmup=3):
    """Median milliseconds of fn() over iters runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if DEVICE == "cpu":
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"


def skewed_counts(rows, experts, gen):
    """Per-expert row counts summing to rows, uneven (a softmax of normal scores), none empty."""
    share = torch.softmax(torch.randn(experts, generator=gen), 0)
    counts = (share * (rows - experts)).floor().long() + 1
    counts[0] += rows - int(counts.sum())
    return counts.tolist()


def grouped_gemm(dtype, experts, hidden, ffn, rows, iters):
    from zeal.moe.sharded_moe import _GroupedMM

    gen = torch.Generator().manual_seed(0)
    counts = skewed_counts(rows, experts, gen)
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(experts, hidden, ffn, device=DEVICE, dtype=dtype) * hidden ** -0.5).requires_grad_(True)
    w2 = (torch.randn(experts, ffn, hidden, device=DEVICE, dtype=dtype) * ffn ** -0.5).requires_grad_(True)
    g = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)

    def grouped():
        y = _GroupedMM.apply(torch.nn.functional.gelu(_GroupedMM.apply(x, w1, counts)), w2, counts)
        y.backward(g)

    def loop():
        outs = []
        for i, piece in enumerate(x.split(counts)):
            outs.append(torch.nn.functional.gelu(piece @ w1[i]) @ w2[i])
        torch.cat(outs).backward(g)

    def forward(grouped_fwd):
        with torch.no_grad():
            if grouped_fwd:
                _GroupedMM.apply(torch.nn.functional.gelu(_GroupedMM.apply(x, w1, counts)), w2, counts)
            else:
                for i, piece in enumerate(x.split(counts)):
                    torch.nn.functional.gelu(piece @ w1[i]) @ w2[i]

    flops_fwd = 2 * rows * hidden * ffn * 2
    out = {}
    for name, fn, flops in (("grouped fwd", lambda: forward(True), flops_fwd),
                            ("loop fwd", lambda: forward(False), flops_fwd),
                            ("grouped fwd+bwd", grouped, 3 * flops_fwd),
                            ("loop fwd+bwd", loop, 3 * flops_fwd)):
        ms = cuda_time(fn, iters)
        out[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        x.grad = w1.grad = w2.grad = None
    # The two paths agree (the same products, summed in other orders).
    with torch.no_grad():
        a = _GroupedMM.apply(x, w1, counts)
        b = torch.cat([piece @ w1[i] for i, piece in enumerate(x.split(counts))])
        out["max_rel_diff"] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    return out


def probe_unaligned():
    """Does torch._grouped_mm take bf16 / fp32 operands whose row count is no multiple of 16 bytes?"""
    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(37, 64, device=DEVICE, dtype=dtype)
        w = torch.randn(4, 64, 32, device=DEVICE, dtype=dtype)
        offs = torch.tensor([10, 20, 30, 37], device=DEVICE, dtype=torch.int32)
        for name, fn in (("2d x 3d (forward)", lambda: torch._grouped_mm(x, w, offs=offs)),
                         ("2d x 2d (weight gradient)", lambda: torch._grouped_mm(x.t(), x[:, :32].contiguous(),
                                                                                  offs=offs))):
            try:
                fn()
                torch.cuda.synchronize()
                result[f"{dtype} {name}"] = "ok"
            except Exception as e:  # noqa: BLE001 - recorded, not hidden
                result[f"{dtype} {name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return result


PROFILE = False


def profile(step, title):
    """Where one layer's step goes: torch.profiler over 3 steps, the top operators by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {title} (3 steps)\n" + prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=50),
          flush=True)


def layer_rows(dtype, k, tokens, hidden, ffn, experts, steps):
    from zeal.moe.layer import MoE

    x_batches = [torch.randn(tokens, hidden, device=DEVICE, dtype=dtype) for _ in range(4)]
    impls = {"zeal": dict(), "zeal-dropless": dict(drop_tokens=False, dropless=True),
             "zeal-dropless-loop": dict(drop_tokens=False, dropless=True)}
    ds = None
    try:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE as DSMoE

        if not dist.is_initialized():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("BENCH_PORT", "29731"))
            deepspeed.init_distributed("nccl" if DEVICE == "cuda" else "gloo", verbose=False)
        ds = DSMoE
        impls.update({"deepspeed": dict(), "deepspeed-nodrop": dict(drop_tokens=False)})
    except Exception as e:  # noqa: BLE001 - DeepSpeed's rows are skipped, the reason printed
        print(f"DeepSpeed's rows skipped: {type(e).__name__}: {e}", flush=True)
    results = {}
    for impl, extra in impls.items():
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.GELU(), torch.nn.Linear(ffn, hidden))
        kwargs = dict(num_experts=experts, ep_size=1, k=k, capacity_factor=1.25, min_capacity=4, **extra)
        try:
            layer = (ds if impl.startswith("deepspeed") else MoE)(hidden, expert, **kwargs)
            if impl.startswith("deepspeed"):
                layer.set_deepspeed_parallelism()
            else:
                layer.deepspeed_moe.grouped_gemm = None if impl == "zeal-dropless" else False
            torch.manual_seed(1)
            layer.deepspeed_moe.gate.wg.weight.data.normal_(std=0.02)
            layer = layer.to(DEVICE, dtype)
            i = [0]

            def step():
                x = x_batches[i[0] % len(x_batches)].requires_grad_(True)
                i[0] += 1
                out, l_aux, _ = layer(x)
                (out.float().square().mean() + 0.01 * l_aux).backward()
                layer.zero_grad(set_to_none=True)

            ms = cuda_time(step, steps)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if DEVICE == "cuda" else 0.0
            if PROFILE and dtype == torch.bfloat16 and k == 2:
                profile(step, f"{impl} bf16 top-{k}")
            results[impl] = {"ms": ms, "tokens_per_s": tokens / ms * 1e3, "peak_mib": peak}
            del layer
        except Exception as e:  # noqa: BLE001 - the failure is the result, printed
            results[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{impl} {dtype} top-{k}: {results[impl]['error']}", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="out/bench/moe_gpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--profile", action="store_true", help="print where the bf16 top-2 layer steps go")
    args = ap.parse_args()
    global DEVICE, PROFILE
    DEVICE, PROFILE = args.device, args.profile
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows as a GPU user runs them
    t0 = time.time()
    probe = probe_unaligned() if DEVICE == "cuda" else {}
    print("torch._grouped_mm with a row count no multiple of 16 bytes:", json.dumps(probe, indent=1), flush=True)

    shapes = [("8 experts 4096->14336", 8, 4096, 14336, 32768), ("64 experts 2048->1408", 64, 2048, 1408, 65536),
              ("8 experts 1024->4096", 8, 1024, 4096, 8192)]
    if args.small:
        shapes = [("4 experts 64->128", 4, 64, 128, 256)]
    gemm, rows = {}, []
    for dtype in (torch.bfloat16, torch.float32):
        for name, e, h, f, r in shapes:
            res = grouped_gemm(dtype, e, h, f, r, args.iters)
            gemm[f"{name} {dtype}"] = res
            rows.append([name, str(dtype).split(".")[1], r] +
                        [f"{res[m]['tflops']:.0f}" for m in ("grouped fwd", "loop fwd", "grouped fwd+bwd", "loop fwd+bwd")] +
                        [f"{res['loop fwd+bwd']['ms'] / res['grouped fwd+bwd']['ms']:.2f}", f"{res['max_rel_diff']:.1e}"])
            print(f"grouped gemm {name} {dtype}: done at +{time.time() - t0:.0f}s", flush=True)
    print_table(f"Grouped GEMM against a per-expert loop, {device_name()} (TFLOP/s; fwd+bwd counts 3x "
                "the forward's FLOPs)",
                ["experts", "dtype", "rows", "grouped fwd", "loop fwd", "grouped fwd+bwd", "loop fwd+bwd",
                 "loop/grouped time", "max rel diff"], rows)

    layers, rows = {}, []
    tokens, hidden, ffn, experts = (256, 64, 128, 4) if args.small else (16384, 1024, 4096, 8)
    for dtype in (torch.bfloat16, torch.float32):
        for k in (1, 2):
            res = layer_rows(dtype, k, tokens, hidden, ffn, experts, args.iters)
            layers[f"{dtype} top{k}"] = res
            for impl, r in res.items():
                if "error" in r:
                    rows.append([str(dtype).split(".")[1], f"top-{k}", impl, "error", "", "", ""])
                    continue
                base = res.get("zeal-dropless" if "-" in impl else "zeal", {})
                rows.append([str(dtype).split(".")[1], f"top-{k}", impl, f"{r['ms']:.2f}", f"{r['tokens_per_s']:,.0f}",
                             f"{r['ms'] / base['ms']:.2f}" if "ms" in base else "", f"{r['peak_mib']:.0f}"])
            print(f"layer {dtype} top-{k}: done at +{time.time() - t0:.0f}s", flush=True)
    print_table(f"MoE layer forward+backward on one {device_name()}: {experts} experts of "
                f"{hidden}->{ffn}->{hidden}, {tokens} tokens, capacity factor 1.25 (time / zeal's: against Zeal's "
                "row of the same kind, capacity or dropless)",
                ["dtype", "gating", "impl", "median ms", "tokens/s", "time / zeal's", "peak MiB"], rows)
    write_json(args.out, {"benchmark": "moe_gpu", "device": device_name(), "torch": torch.__version__,
                          "grouped_mm_unaligned": probe, "grouped_gemm": gemm, "layer": layers,
                          "layer_shape": {"tokens": tokens, "hidden": hidden, "ffn": ffn, "experts": experts}})


if __name__ == "__main__":
    main()
