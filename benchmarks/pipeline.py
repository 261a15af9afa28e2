"""Pipeline schedules measured: p stages on p ranks (--stages, 2 and 4), 8 to 32 micro-batches,
1F1B and interleaved 1F1B (2 chunks per stage), against the theoretical bubble (p - 1) / (m + p - 1)
(interleaved: (p - 1) / (v m + p - 1)) and against DeepSpeed's PipelineEngine (1F1B) on the same
layers.

The model: 8 blocks of Linear(H, H) + GELU, micro-batches of `--micro` rows, AdamW, fp32. Each
rank uses one thread. The measured bubble is 1 - (the stages' mean time in forward and backward) /
(the time from the batch's start, a barrier, until the last stage reaches its optimizer step),
averaged over the measured batches: the idle time the schedule leaves, communication included,
as the theory counts it. It means something only when
every rank has a core of its own: with more ranks than cores (4 stages on a 2-core machine) the
stages queue for the cores and the measure is mostly that wait; the table marks those rows, and
their step times still compare the schedules and the peers.

--sleep_ms T replaces each block's compute by a wait: forward sleeps T ms, backward 2T (a
Linear(64) keeps a parameter to train). Waiting takes no core, so 4 stages (or more) run on 2 cores
as on 4, and the bubble is the schedule's and the executor's own. There every stage's busy time is
known, m * (blocks per stage) * 3T, so the table also gives each implementation's bubble from its
step time alone: 1 - busy / step, DeepSpeed's included.

    python3 benchmarks/pipeline.py --stages 2 4 --micro_batches 8 16 32 --out out/bench/pipeline.json
    python3 benchmarks/pipeline.py --stages 4 --micro_batches 8 16 32 --sleep_ms 4 --out out/bench/pipeline_sleep.json
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
SLEEP_HIDDEN = 64


def _sleep_block_class():
    import torch

    class Wait(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, seconds):
            time.sleep(seconds)
            ctx.seconds = seconds
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(2 * ctx.seconds)
            return grad, None

    class SleepBlock(torch.nn.Module):
        """A block whose compute is a wait: T ms forward, 2T backward."""

        def __init__(self, hidden, ms):
            super().__init__()
            self.linear = torch.nn.Linear(hidden, hidden)
            self.seconds = ms / 1000.0

        def forward(self, x):
            return Wait.apply(self.linear(x), self.seconds)

    return SleepBlock


def layer_specs(args, spec):
    """The model's layers, each built through spec(cls, *args) (a LayerSpec, or the module itself)."""
    import torch

    out = []
    for _ in range(BLOCKS):
        if args.sleep_ms:
            out.append(spec(_sleep_block_class(), SLEEP_HIDDEN, args.sleep_ms))
        else:
            out += [spec(torch.nn.Linear, args.hidden, args.hidden), torch.nn.GELU()]
    return out


def hidden_of(args):
    return SLEEP_HIDDEN if args.sleep_ms else args.hidden


def rank_zeal(args):
    import torch

    import zeal
    from zeal.pipe import LayerSpec, PipelineModule

    torch.set_num_threads(1)
    chunks = 2 if args.rank_impl == "zeal_interleaved" else 1
    module = PipelineModule(layer_specs(args, LayerSpec), num_stages=args.rank_stages, loss_fn=torch.nn.functional.mse_loss,
                            partition_method="uniform", chunks_per_stage=chunks)
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.rank_m,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9,
              "pipeline": {"schedule": "interleaved" if chunks > 1 else "1f1b"}, "comms_timeout_s": 600}
    engine, *_ = zeal.initialize(model=module, config=config)
    g = torch.Generator().manual_seed(0)
    h = hidden_of(args)
    data = [(torch.randn(args.micro, h, generator=g), torch.randn(args.micro, h, generator=g))
            for _ in range(args.rank_m)]
    times, bubbles = [], []
    for step in range(args.warmup + args.steps):
        engine.module.world.barrier().wait()
        t0 = time.perf_counter()
        engine.train_batch(iter(data))
        engine.module.world.barrier().wait()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            # The bubble as the theory counts it: the stages' mean compute time against the time
            # until the last stage reaches its optimizer step (all started together, at the barrier).
            t = engine.last_batch_timing
            busy = torch.tensor([t["busy_s"]], dtype=torch.float64)
            span = torch.tensor([t["pipelined_s"]], dtype=torch.float64)
            world = engine.module.world
            world.all_reduce(busy, "sum").wait()
            world.all_reduce(span, "max").wait()
            bubbles.append(1.0 - busy.item() / world.size / span.item())
    if engine.module.world.rank == 0:
        print(json.dumps({"impl": args.rank_impl, "m": args.rank_m, "times_s": times,
                          "bubble": statistics.mean(bubbles)}), flush=True)


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
    module = PipelineModule(layer_specs(args, lambda cls, *a: cls(*a)), num_stages=args.rank_stages, loss_fn=torch.nn.functional.mse_loss,
                            partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.rank_m,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    g = torch.Generator().manual_seed(0)
    h = hidden_of(args)
    data = [(torch.randn(args.micro, h, generator=g), torch.randn(args.micro, h, generator=g))
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
    ap.add_argument("--sleep_ms", type=float, default=0.0,
                    help="each block waits this long forward (twice backward) instead of computing")
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
            # Sleep mode: every stage is busy m * (blocks per stage) * 3T, whatever the schedule.
            busy = m * (BLOCKS / stages) * 3 * args.sleep_ms / 1000.0
            for impl in impls:
                port += 1
                os.environ["BENCH_PORT"] = str(port)
                print(f"pipeline: {impl}, {stages} stages, {m} micro-batches ...", flush=True)
                out = mpirun(stages, sys.executable, __file__, "--rank_impl", impl, "--rank_m", m, "--rank_stages",
                             stages, "--micro", args.micro, "--hidden", args.hidden, "--steps", args.steps,
                             "--warmup", args.warmup, "--sleep_ms", args.sleep_ms, timeout=1800)
                record = json.loads(re.findall(r'\{"impl"[^{}]*\}', out)[0])
                med[impl] = statistics.median(record["times_s"])
                v = 2 if impl == "zeal_interleaved" else 1
                theory = (stages - 1) / (v * m + stages - 1)
                from_step = 1.0 - busy / med[impl] if args.sleep_ms else None
                results.append({**record, "stages": stages, "median_s": med[impl], "theoretical_bubble": theory,
                                "bubble_from_step_time": from_step})
                measured = "-" if record["bubble"] is None else \
                    f"{record['bubble']:.3f}" + (" (shared cores)" if stages > cores and not args.sleep_ms else "")
                name = {"zeal_1f1b": "zeal 1F1B", "zeal_interleaved": "zeal interleaved (v=2)",
                        "deepspeed": "deepspeed 1F1B"}[impl]
                row = [stages, m, name, f"{med[impl] * 1e3:.0f}", measured, f"{theory:.3f}"]
                if args.sleep_ms:
                    row.append(f"{from_step:.3f}")
                rows.append(row + [""])
            if "deepspeed" in med and "zeal_1f1b" in med:
                rows[-1][-1] = f"Zeal 1F1B {med['deepspeed'] / med['zeal_1f1b']:.2f}x faster"
    columns = ["stages", "micro-batches", "schedule", "step ms", "measured bubble", "theoretical bubble"]
    if args.sleep_ms:
        columns.append("bubble from step time")
    work = (f"{BLOCKS} blocks waiting {args.sleep_ms:g} ms forward / {2 * args.sleep_ms:g} ms backward"
            if args.sleep_ms else f"{BLOCKS} blocks of Linear({args.hidden}) + GELU")
    print_table(f"Pipeline, p stages on p ranks ({cores} cores), {work}, micro-batch {args.micro}, fp32",
                columns + ["vs DeepSpeed"], rows)
    write_json(args.out, {"benchmark": "pipeline", "stages": args.stages, "micro": args.micro, "hidden": args.hidden,
                          "sleep_ms": args.sleep_ms, "cores": cores, "results": results})


if __name__ == "__main__":
    main()
