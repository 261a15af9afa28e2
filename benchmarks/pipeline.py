"""Pipeline schedules measured: p stages on p ranks (--stages, 2 and 4), 8 to 32 micro-batches,
1F1B and interleaved 1F1B (2 chunks per stage), against the theoretical bubble (p - 1) / (m + p - 1)
(interleaved: (p - 1) / (v m + p - 1)) and against DeepSpeed's PipelineEngine (1F1B) on the same
layers.

The model: 8 blocks of Linear(H, H) + GELU, micro-batches of `--micro` rows, AdamW, fp32. Each
rank uses one thread. The measured bubble is 1 - (time a stage spends in forward and backward) /
(time from the batch's start to its optimizer step), averaged over the stages and the measured
batches: the idle time the schedule leaves, communication included. It means something only when
every rank has a core of its own: with more ranks than cores (4 stages on a 2-core machine) the
stages queue for the cores and the measure is mostly that wait; the table marks those rows, and
their step times still compare the schedules and the peers.

    python3 benchmarks/pipeline.py --stages 2 4 --micro_batches 8 16 32 --out out/bench/pipeline.json
"""
import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import time

from harness import mpirun, print_table, write_json

BLOCKS = 8


def blocks(hidden):
    import torch

    out = []
    for _ in range(BLOCKS):
        out += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
    return out


def rank_zeal(args):
    import torch

    import zeal
    from zeal.pipe import LayerSpec, PipelineModule

    torch.set_num_threads(1)
    layers = []
    for _ in range(BLOCKS):
        layers += [LayerSpec(torch.nn.Linear, args.hidden, args.hidden), torch.nn.GELU()]
    chunks = 2 if args.rank_impl == "zeal_interleaved" else 1
    module = PipelineModule(layers, num_stages=args.rank_stages, loss_fn=torch.nn.functional.mse_loss,
                            partition_method="uniform", chunks_per_stage=chunks)
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.rank_m,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9,
              "pipeline": {"schedule": "interleaved" if chunks > 1 else "1f1b"}, "comms_timeout_s": 600}
    engine, *_ = zeal.initialize(model=module, config=config)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.micro, args.hidden, generator=g), torch.randn(args.micro, args.hidden, generator=g))
            for _ in range(args.rank_m)]
    times, bubbles = [], []
    for step in range(args.warmup + args.steps):
        engine.module.world.barrier().wait()
        t0 = time.perf_counter()
        engine.train_batch(iter(data))
        engine.module.world.barrier().wait()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            t = engine.last_batch_timing
            bubbles.append(1.0 - t["busy_s"] / t["pipelined_s"])
    bubble = torch.tensor([statistics.mean(bubbles)], dtype=torch.float64)
    engine.module.world.all_reduce(bubble, "sum").wait()
    if engine.module.world.rank == 0:
        print(json.dumps({"impl": args.rank_impl, "m": args.rank_m, "times_s": times,
                          "bubble": bubble.item() / engine.module.world.size}), flush=True)


def rank_deepspeed(args):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    torch.set_num_threads(1)
    rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BENCH_PORT"])
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    module = PipelineModule(blocks(args.hidden), num_stages=args.rank_stages, loss_fn=torch.nn.functional.mse_loss,
                            partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.rank_m,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.micro, args.hidden, generator=g), torch.randn(args.micro, args.hidden, generator=g))
            for _ in range(args.rank_m)]
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        engine.train_batch(iter(data))
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"impl": args.rank_impl, "m": args.rank_m, "times_s": times, "bubble": None}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro_batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default="out/bench/pipeline.json")
    ap.add_argument("--rank_impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rank_m", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rank_stages", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_impl:
        (rank_deepspeed if args.rank_impl == "deepspeed" else rank_zeal)(args)
        return

    impls = ["zeal_1f1b", "zeal_interleaved"]
    if importlib.util.find_spec("deepspeed") is not None:
        impls.append("deepspeed")
    else:
        print("DeepSpeed is not installed (scripts/install-bench-deps): its rows are skipped")
    if args.only:
        impls = [i for i in impls if i in args.only]
    results, rows = [], []
    port = 29900
    cores = os.cpu_count() or 1
    for stages in args.stages:
        for m in args.micro_batches:
            med = {}
            for impl in impls:
                port += 1
                os.environ["BENCH_PORT"] = str(port)
                print(f"pipeline: {impl}, {stages} stages, {m} micro-batches ...", flush=True)
                out = mpirun(stages, sys.executable, __file__, "--rank_impl", impl, "--rank_m", m, "--rank_stages",
                             stages, "--micro", args.micro, "--hidden", args.hidden, "--steps", args.steps,
                             "--warmup", args.warmup, timeout=1800)
                record = json.loads(re.findall(r'\{"impl"[^{}]*\}', out)[0])
                med[impl] = statistics.median(record["times_s"])
                results.append({**record, "stages": stages, "median_s": med[impl]})
                if impl != "deepspeed":
                    v = 2 if impl == "zeal_interleaved" else 1
                    theory = (stages - 1) / (v * m + stages - 1)
                    measured = f"{record['bubble']:.3f}" + (" (shared cores)" if stages > cores else "")
                    rows.append([stages, m, impl, f"{med[impl] * 1e3:.0f}", measured, f"{theory:.3f}", ""])
            if "deepspeed" in med:
                base = med.get("zeal_1f1b")
                rows.append([stages, m, "deepspeed 1F1B", f"{med['deepspeed'] * 1e3:.0f}", "-",
                             f"{(stages - 1) / (m + stages - 1):.3f}",
                             f"Zeal 1F1B {med['deepspeed'] / base:.2f}x faster" if base else ""])
    print_table(f"Pipeline, p stages on p ranks ({cores} cores), {BLOCKS} blocks of Linear({args.hidden}) + GELU, "
                f"micro-batch {args.micro}, fp32", ["stages", "micro-batches", "schedule", "step ms",
                                                    "measured bubble", "theoretical bubble", "vs DeepSpeed"], rows)
    write_json(args.out, {"benchmark": "pipeline", "stages": args.stages, "micro": args.micro, "hidden": args.hidden,
                          "cores": cores, "results": results})


if __name__ == "__main__":
    main()
