"""Per-rank training-state memory at ZeRO stages 0-3 for a model of >= 100M parameters: Zeal's
prediction (zeal.estimate_memory), the bytes the engine really holds after a training step
(engine state_bytes: every tensor it owns), the process's peak RSS growth, and the ZeRO paper's
formula, on 2 and 4 ranks. bf16 + AdamW, the paper's setting. "build peak" is the RSS high-water
mark growth while the model is built (whole fp32 model, or under zeal.zero.Init at stage 3).

    python benchmarks/zero_memory.py --ranks 2 4 --out out/bench/zero_memory.json
"""
import argparse
import json
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH, LAYERS = 4096, 6  # 6 x (4096 x 4096 + 4096) = 100.7M parameters


def make_model():
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 5_000_000,
                                  "stage3_prefetch_bucket_size": 5_000_000}}


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rank_main(stage):
    import torch

    import zeal

    torch.set_num_threads(1)
    zeal.world()
    base = rss_kib()
    cfg = config(stage)
    if stage == 3:
        with zeal.zero.Init(config_dict_or_path=cfg, dtype=torch.bfloat16):
            model = make_model()
    else:
        model = make_model()
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base * 1024
    engine, *_ = zeal.initialize(model=model, config=cfg)
    x = torch.randn(2, WIDTH, dtype=torch.bfloat16)
    for _ in range(2):
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    held = dict(engine._core.state_bytes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if engine.global_rank == 0:
        print(json.dumps({"stage": stage, "held": held, "held_total": sum(held.values()),
                          "rss_growth": (rss_kib() - base) * 1024, "peak_rss_growth": (peak - base) * 1024,
                          "build_peak_growth": build_peak,
                          "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                        for p in model.parameters())}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--out", default="out/bench/zero_memory.json")
    ap.add_argument("--rank_stage", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_stage is not None:
        rank_main(args.rank_stage)
        return

    sys.path.insert(0, str(HERE))
    from harness import json_lines, mpirun, print_table, write_json

    import zeal

    rows, results = [], []
    gib = 2**30
    for world in args.ranks:
        for stage in args.stages:
            print(f"zero_memory: stage {stage} on {world} ranks ...", flush=True)
            r = json_lines(mpirun(world, sys.executable, __file__, "--rank_stage", stage, timeout=900))[0]
            numels = [WIDTH * WIDTH, WIDTH] * LAYERS
            pred = zeal.estimate_memory(_Sizes(numels), config(stage), world, stages=(stage,))[stage]
            r.update(world=world, predicted=pred["total"], paper=pred["paper"], transient=pred["transient"])
            results.append(r)
            rows.append([world, stage, f"{r['params'] / 1e6:.1f}M", f"{pred['paper'] / gib:.3f}",
                         f"{pred['total'] / gib:.3f}", f"{r['held_total'] / gib:.3f}",
                         f"{r['held_total'] / pred['paper']:.3f}", f"{r['build_peak_growth'] / gib:.3f}",
                         f"{r['peak_rss_growth'] / gib:.3f}"])
    print_table("per-rank training state (GiB), bf16 + AdamW",
                ["ranks", "stage", "params", "paper", "predicted", "held", "held/paper", "build peak",
                 "peak RSS growth"], rows)
    write_json(args.out, {"benchmark": "zero_memory", "results": results})


class _Sizes:
    """Stands in for a module: estimate_memory only reads parameter sizes."""

    def __init__(self, numels):
        self.numels = numels

    def parameters(self):
        import torch

        for n in self.numels:
            p = torch.empty(0)
            p.requires_grad_(True)
            p.ds_numel = n
            yield p


if __name__ == "__main__":
    main()
