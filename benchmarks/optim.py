"""Optimizer step throughput on the CPU against the memory-bandwidth roofline and the peers, in one run.

fp32 Adam(W) moves 28 bytes per parameter (reads parameter, gradient and two moments; writes the
parameter and the moments). For each size: Zeal's CPUAdam kernel (each instruction set),
torch.optim.AdamW (foreach and fused=True), DeepSpeed's DeepSpeedCPUAdam (when DeepSpeed is
installed and its op builds), and the roofline: two bandwidth kernels on the same threads, STREAM's
triad a = b + s * c and the in-place a += s * b (12 bytes per element each; the in-place one has
the optimizers' read-modify-write pattern, so no write-allocate traffic goes uncounted). The
roofline is the faster of the two.

Fairness on a noisy host: every implementation updates the same four buffers (parameter,
gradient, moments; torch's and DeepSpeed's optimizer state is pointed at them), so page placement
is the same for all, and the implementations take turns step by step, in an order that rotates, so a slow
spell of the shared memory system hits all of them alike. Each reports its median step.

    python benchmarks/optim.py --sizes 10e6 100e6 1e9 --out out/bench/optim.json

At 1e9 parameters the buffers take 16 GB; torch's foreach AdamW allocates temporaries of the
full size on top and is left out from 5e8 parameters on (--foreach_limit).

--device cuda compares Zeal's multi-tensor FusedAdam with torch's fused and foreach AdamW on the
GPU, against the device-to-device copy bandwidth (8 bytes per element) as the roofline. Measured
on an H100 (docs/benchmarks.md); there, run it with --foreach_limit 2e9 (80 GB holds foreach's
temporaries).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BYTES_PER_PARAM = 28


class Buffers:
    def __init__(self, n, device="cpu"):
        self.p, self.g = torch.randn(n, device=device), torch.randn(n, device=device) * 1e-2
        self.m, self.v = torch.zeros(n, device=device), torch.zeros(n, device=device)


def zeal_adam(b, isa=""):
    import zeal

    state = {"step": 0}

    def step():
        state["step"] += 1
        zeal._zeal.cpu_adam_step(b.p, b.g, b.m, b.v, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, True, state["step"], isa=isa)
    return step


def torch_adam(b, **kind):
    p = torch.nn.Parameter(b.p)  # shares b.p's storage
    p.grad = b.g
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kind)
    # torch's fused kernel keeps the step count beside the parameters on a GPU; foreach keeps it on the CPU.
    step_device = p.device if kind.get("fused") and p.is_cuda else "cpu"
    opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=step_device),
                    "exp_avg": b.m, "exp_avg_sq": b.v}
    return opt.step


def deepspeed_adam(b):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = torch.nn.Parameter(b.p)
    p.grad = b.g
    opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)
    opt.state[p] = {"step": 0, "exp_avg": b.m, "exp_avg_sq": b.v}
    return opt.step


def roofline(b):
    """name -> (step, bytes moved per element)."""
    import zeal

    if b.p.is_cuda:  # the device-to-device copy: read 4 bytes, write 4 bytes
        return {"roofline: device copy": (lambda: b.m.copy_(b.p), 8)}
    return {"roofline: triad a = b + s*c": (lambda: zeal._zeal.cpu_triad(b.m, b.p, b.g, 1e-6), 12),
            "roofline: in place a += s*b": (lambda: zeal._zeal.cpu_triad(b.m, b.g, None, 1e-6), 12)}


def zeal_fused_adam(b):
    import zeal

    state = {"step": 0}

    def step():
        state["step"] += 1
        zeal._zeal.fused_adam_step([b.p], [b.g], [b.m], [b.v], 1e-3, 0.9, 0.999, 1e-8, 0.01, True, True,
                                   state["step"])
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[10e6, 100e6])
    ap.add_argument("--repeats", type=int, default=40, help="timed steps of each implementation")
    ap.add_argument("--foreach_limit", type=float, default=5e8, help="skip torch foreach AdamW from this size (its temporaries)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: Zeal's FusedAdam against torch's fused and foreach AdamW and the device copy "
                         "bandwidth")
    ap.add_argument("--out", default="out/bench/optim.json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from harness import print_table, write_json

    import zeal

    gpu = args.device == "cuda"
    makers = {
        "zeal FusedAdam": zeal_fused_adam,
        "torch AdamW foreach": lambda b: torch_adam(b, foreach=True),
        "torch AdamW fused": lambda b: torch_adam(b, fused=True),
    } if gpu else {
        f"zeal CPUAdam ({zeal.optim.CPUAdam.isa()})": zeal_adam,
        "zeal CPUAdam (avx2)": lambda b: zeal_adam(b, "avx2"),
        "zeal CPUAdam (scalar)": lambda b: zeal_adam(b, "scalar"),
        "torch AdamW foreach": lambda b: torch_adam(b, foreach=True),
        "torch AdamW fused": lambda b: torch_adam(b, fused=True),
        "DeepSpeedCPUAdam": deepspeed_adam,
    }
    rows, results = [], []
    for size in args.sizes:
        n = int(size)
        print(f"optim: {n:.0e} parameters ...", flush=True)
        b = Buffers(n, args.device)
        roof = roofline(b)
        steps = {name: fn for name, (fn, _) in roof.items()}
        for name, make in makers.items():
            if name == "torch AdamW foreach" and n >= args.foreach_limit:
                print(f"optim: {name} left out at {n:.0e} parameters (temporaries of the full size)")
                continue
            try:
                steps[name] = make(b)
                steps[name]()  # warm-up (DeepSpeed builds its op here)
                steps[name]()
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                steps.pop(name, None)
                print(f"optim: {name} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        samples = {name: [] for name in steps}
        names = list(steps)
        for r in range(args.repeats):
            # The order rotates: each step partly pays for writing back what the previous one left
            # dirty in the cache, so every implementation follows every other equally often.
            for name in names[r % len(names):] + names[:r % len(names)]:
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                steps[name]()
                if gpu:
                    torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - start)
        times = {name: statistics.median(s) for name, s in samples.items()}
        bw = max(roof[name][1] * n / t for name, t in times.items() if name in roof)
        fastest_torch = min((t for k, t in times.items() if k.startswith("torch")), default=None)
        deepspeed = times.get("DeepSpeedCPUAdam")
        for name, t in times.items():
            if name in roof:
                gbps = roof[name][1] * n / t / 1e9
                results.append({"impl": name, "params": n, "seconds": t, "gbps": gbps})
                rows.append([f"{n / 1e6:.0f}M", name, "", f"{gbps:.1f}", f"{gbps * 1e9 / bw:.2f}", "", ""])
                continue
            gbps = BYTES_PER_PARAM * n / t / 1e9
            results.append({"impl": name, "params": n, "seconds": t, "params_per_s": n / t, "gbps": gbps,
                            "fraction_of_roofline": gbps * 1e9 / bw,
                            "vs_fastest_torch": fastest_torch / t if fastest_torch else None,
                            "vs_deepspeed": deepspeed / t if deepspeed else None})
            rows.append([f"{n / 1e6:.0f}M", name, f"{n / t / 1e6:.0f}", f"{gbps:.1f}", f"{gbps * 1e9 / bw:.2f}",
                         f"{fastest_torch / t:.2f}" if fastest_torch else "", f"{deepspeed / t:.2f}" if deepspeed else ""])
        del steps, b
    where = (torch.cuda.get_device_name(0) if gpu else
             f"the CPU ({torch.get_num_threads()} threads; Zeal kernel: {zeal.optim.CPUAdam.isa()})")
    print_table(f"fp32 AdamW step on {where}",
                ["params", "impl", "Mparams/s", "GB/s", "of roofline", "vs fastest torch", "vs DeepSpeed"], rows)
    write_json(args.out, {"benchmark": "optim", "device": where, "threads": torch.get_num_threads(),
                          "isa": zeal.optim.CPUAdam.isa(),
                          "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
