"""Optimizer step throughput on the CPU against the memory-bandwidth roofline and the peers, in one run.

fp32 Adam(W) moves 28 bytes per parameter (reads parameter, gradient and two moments; writes the
parameter and the moments). For each size: Zeal's CPUAdam kernel, torch.optim.AdamW (foreach and
fused=True), DeepSpeed's DeepSpeedCPUAdam (when DeepSpeed is installed and its op builds), and a
STREAM-style triad (a = b + s * c, 12 bytes per element) measuring the bandwidth this machine
reaches from torch's threads. Reports parameters/s, GB/s and the fraction of the triad bandwidth.

    python benchmarks/optim.py --sizes 10e6 100e6 --out out/bench/optim.json
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BYTES_PER_PARAM = 28


def timed(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def triad(n, repeats):
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    return timed(lambda: torch.add(b, c, alpha=1.5, out=a), repeats)


def zeal_adam(n, repeats, isa=""):
    import zeal

    p, g, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
    state = {"step": 0}

    def step():
        state["step"] += 1
        zeal._zeal.cpu_adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, True, state["step"], isa=isa)
    return timed(step, repeats)


def torch_adam(n, repeats, **kind):
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kind)
    return timed(opt.step, repeats)


def deepspeed_adam(n, repeats):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)
    return timed(opt.step, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[10e6, 100e6])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="out/bench/optim.json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from harness import print_table, write_json

    import zeal

    impls = {
        f"zeal CPUAdam ({zeal.optim.CPUAdam.isa()})": zeal_adam,
        "zeal CPUAdam (avx2)": lambda n, r: zeal_adam(n, r, "avx2"),
        "zeal CPUAdam (scalar)": lambda n, r: zeal_adam(n, r, "scalar"),
        "torch AdamW foreach": lambda n, r: torch_adam(n, r, foreach=True),
        "torch AdamW fused": lambda n, r: torch_adam(n, r, fused=True),
        "DeepSpeedCPUAdam": deepspeed_adam,
    }
    rows, results = [], []
    for size in args.sizes:
        n = int(size)
        bw = 12 * n / triad(n, args.repeats)
        results.append({"impl": "triad", "params": n, "gbps": bw / 1e9})
        rows.append([f"{n / 1e6:.0f}M", "triad (a = b + s*c)", "", f"{bw / 1e9:.1f}", "1.00", ""])
        times = {}
        for name, fn in impls.items():
            try:
                times[name] = fn(n, args.repeats)
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                print(f"optim: {name} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        fastest_torch = min(t for k, t in times.items() if k.startswith("torch"))
        for name, t in times.items():
            gbps = BYTES_PER_PARAM * n / t / 1e9
            results.append({"impl": name, "params": n, "seconds": t, "params_per_s": n / t, "gbps": gbps,
                            "fraction_of_triad": gbps * 1e9 / bw})
            rows.append([f"{n / 1e6:.0f}M", name, f"{n / t / 1e6:.0f}", f"{gbps:.1f}", f"{gbps * 1e9 / bw:.2f}",
                         f"{fastest_torch / t:.2f}"])
    print_table(f"fp32 AdamW step on the CPU ({torch.get_num_threads()} threads; Zeal kernel: {zeal.optim.CPUAdam.isa()})",
                ["params", "impl", "Mparams/s", "GB/s", "of triad", "vs fastest torch"], rows)
    write_json(args.out, {"benchmark": "optim", "threads": torch.get_num_threads(), "isa": zeal.optim.CPUAdam.isa(),
                          "results": results})


if __name__ == "__main__":
    main()
