"""Frozen weights at ZeRO-3, LoRA-style: a frozen base (8 layers of 1024 x 1024, 8.4M parameters)
with trainable rank-8 adapters (131K parameters), fp32 AdamW on N CPU ranks, the same data and seed.
For each implementation: the bytes this rank holds for the frozen weights, the median step time,
the peak resident-memory growth per rank and the loss after the last step.

    zeal            ZeRO-3: the frozen weights partitioned (Note [Frozen parameters])
    zeal+quantized  the same with zero_quantized_nontrainable_weights: their chunks stored as 8-bit blocks
    deepspeed       DeepSpeed's ZeRO-3 (DS_ACCELERATOR=cpu), which partitions them too; its
                    zero_quantized_nontrainable_weights needs its CUDA quantizer, so it has no CPU row

    scripts/install-bench-deps     # DeepSpeed, pinned (optional; its row is skipped without it)
    python benchmarks/zeropp_frozen.py --ranks 2 --steps 12 --out out/bench/zeropp_frozen.json
"""
import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import rss_bytes  # noqa: E402

WIDTH, LAYERS, RANK, LR = 1024, 8, 8, 1e-3


def make_model():
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(WIDTH, WIDTH)
            self.lora_a = torch.nn.Linear(WIDTH, RANK, bias=False)
            self.lora_b = torch.nn.Linear(RANK, WIDTH, bias=False)
            torch.nn.init.normal_(self.lora_b.weight, std=1e-3)
            self.base.requires_grad_(False)

        def forward(self, x):
            return torch.nn.functional.gelu(self.base(x) + self.lora_b(self.lora_a(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(LoRALinear() for _ in range(LAYERS))

        def forward(self, x, y):
            for layer in self.layers:
                x = layer(x)
            return torch.nn.functional.mse_loss(x, y)

    torch.manual_seed(0)
    return Net()


def batches(steps, micro, rank, world):
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(micro * world, WIDTH, generator=g)
        y = torch.tanh(x.flip(1))
        out.append((x[rank::world], y[rank::world]))
    return out


def config(micro, quantized):
    return {"train_micro_batch_size_per_gpu": micro, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": quantized,
                                  "stage3_param_persistence_threshold": 0,
                                  "stage3_prefetch_bucket_size": 2_000_000}}


def rank_main(impl, steps, micro):
    import torch

    torch.set_num_threads(1)
    if impl.startswith("zeal"):
        import zeal

        world = zeal.world()
        rank, size = world.rank, world.size
        base = rss_bytes()
        model = make_model()
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = zeal.initialize(model=model, model_parameters=trainable,
                                     config=config(micro, impl.endswith("quantized")))
        core = engine._core
        frozen = core.state_bytes["params"] - 4 * core.master_numel  # after initialize nothing is live
        from harness import zeal_step_and_sync

        step, sync = zeal_step_and_sync(engine)

        def loss_of(x, y):
            return engine(x, y)
    else:
        import deepspeed
        import torch.distributed as dist

        rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BENCH_PORT"])
        dist.init_process_group("gloo", rank=rank, world_size=size)
        base = rss_bytes()
        model = make_model()
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config(micro, False),
                                          dist_init_required=False)
        frozen = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters()
                     if not p.requires_grad)

        def step(x, y):
            engine.backward(engine(x, y))
            engine.step()

        def sync():
            dist.barrier()

        def loss_of(x, y):
            return engine(x, y)
    from harness import time_steps

    data = batches(steps + 4, micro, rank, size)  # time_steps warms up on 3
    times = time_steps(step, data[:-1], steps, sync)
    with torch.no_grad():
        loss = loss_of(*data[-1]).item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": impl, "rank": rank, "times_s": times, "frozen_bytes": frozen, "loss": loss,
                      "peak_growth": peak - base}), flush=True)


PLAN = ["zeal", "zeal+quantized", "deepspeed"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/bench/zeropp_frozen.json")
    ap.add_argument("--rank_impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_impl:
        rank_main(args.rank_impl, args.steps, args.micro)
        return
    from harness import mpirun, print_table, write_json

    plan = list(PLAN)
    if importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed is not installed (scripts/install-bench-deps): its row is skipped")
        plan.remove("deepspeed")
    os.environ["DS_ACCELERATOR"] = "cpu"
    records = {p: [] for p in plan}
    port = 29900
    for r in range(args.rounds):  # alternate implementations so drift hits all of them alike
        for impl in plan:
            port += 1
            os.environ["BENCH_PORT"] = str(port)
            print(f"zeropp_frozen: round {r + 1}, {impl} ...", flush=True)
            out = mpirun(args.ranks, sys.executable, __file__, "--rank_impl", impl, "--steps", args.steps,
                         "--micro", args.micro, timeout=900)
            found = [json.loads(m) for m in re.findall(r'\{"impl"[^{}]*\}', out)]
            assert len(found) == args.ranks, out
            records[impl].append(found)
    frozen_params = LAYERS * (WIDTH * WIDTH + WIDTH)
    summary, rows = {}, []
    base_ms = None
    for impl in plan:
        rank0 = [next(x for x in rec if x["rank"] == 0) for rec in records[impl]]
        ms = statistics.median(t for x in rank0 for t in x["times_s"]) * 1e3
        base_ms = base_ms or ms
        frozen = max(x["frozen_bytes"] for rec in records[impl] for x in rec)
        peak = max(x["peak_growth"] for rec in records[impl] for x in rec) / 2**20
        loss = rank0[0]["loss"]
        summary[impl] = {"median_step_ms": ms, "frozen_bytes_per_rank": frozen, "peak_rss_growth_mib": peak,
                         "loss": loss}
        rows.append([impl, f"{frozen / 2**20:.2f}", f"{frozen / (4 * frozen_params):.3f}", f"{ms:.1f}",
                     f"{base_ms / ms:.2f}", f"{peak:.0f}", f"{loss:.8f}"])
    print_table(f"Frozen weights at ZeRO-3, LoRA-style: {frozen_params / 1e6:.1f}M frozen, "
                f"{LAYERS * 2 * WIDTH * RANK / 1e3:.0f}K trainable, {args.ranks} ranks, "
                f"micro batch {args.micro}, fp32, CPU",
                ["impl", "frozen MiB/rank", "of whole fp32", "median step ms", "zeal/this time",
                 "peak RSS growth MiB", "loss after"], rows)
    write_json(args.out, {"benchmark": "zeropp_frozen", "ranks": args.ranks, "micro": args.micro, "steps": args.steps,
                          "frozen_parameters": frozen_params, "summary": summary})


if __name__ == "__main__":
    main()
