"""ZeRO against its peers, in one run: the demo model (char GPT, 3.2M parameters) at N ranks on
CPU, same data, same micro batch, AdamW + clipping, fp32. For each implementation and stage:
median step time and the peak resident-memory growth per rank (peak RSS during training minus
RSS just before the model is built, max over ranks).

    Zeal stage 1, 2, 3
    torch ZeroRedundancyOptimizer + DDP (~ stage 1)      gloo
    torch FSDP2 fully_shard (~ stage 3)                   gloo
    DeepSpeed stage 1, 2, 3 (DS_ACCELERATOR=cpu)          gloo, torch AdamW

With --client, Zeal's own AdamW (config section, its SIMD kernel) against the user's
torch.optim.AdamW passed to initialize (the client-optimizer path: the update runs torch's AdamW
over this rank's fp32 partition) and torch's peers, at stages 1-3.

With --offload, ZeRO-Offload instead (offload_optimizer {device: cpu}) at stages 1-3: Zeal
without offload, Zeal with it, and DeepSpeed with it (its DeepSpeedCPUAdam, which it builds on
first use).

    scripts/install-bench-deps     # DeepSpeed, pinned (optional; its rows are skipped without it)
    python benchmarks/zero_vs_peers.py --ranks 2 --steps 20 --out out/bench/zero_vs_peers.json
    python benchmarks/zero_vs_peers.py --ranks 2 --steps 20 --offload --out out/bench/offload.json
    python benchmarks/zero_vs_peers.py --ranks 2 --steps 20 --client --out out/bench/client_optimizer.json
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
sys.path.insert(0, str(HERE.parent / "examples" / "python"))
sys.path.insert(0, str(HERE))
from harness import rss_bytes  # noqa: E402

VOCAB, BLOCK = 96, 128


def torch_dist_init(rank, world):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BENCH_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)


def torch_step(forward, model, opt, clip):
    """One plain-torch training step: forward returns the loss; clip by global norm; optimizer step."""
    import torch

    def step(x, y):
        loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return step


def rank_main(impl, stage, steps, micro, clip):
    import torch

    impl, _, variant = impl.partition("+")
    offload = variant in ("offload", "nvme")
    # offload_optimizer as each variant asks: host memory, or swap files under BENCH_NVME_PATH.
    offload_config = ({"device": "cpu"} if variant == "offload" else
                      {"device": "nvme", "nvme_path": os.environ.get("BENCH_NVME_PATH", "/tmp"),
                       "pipeline_read": True, "pipeline_write": True, "buffer_count": 8} if variant == "nvme" else None)
    aio = {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}

    from gpt import GPT

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, VOCAB, (micro, BLOCK), generator=g),
                torch.randint(0, VOCAB, (micro, BLOCK), generator=g)) for _ in range(4)]
    lr, wd = 1e-3, 0.01
    if impl == "zeal":
        import zeal

        zeal.world()
        base = rss_bytes()
        torch.manual_seed(0)
        model = GPT(VOCAB, block=BLOCK)
        config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": clip, "steps_per_print": 10**9,
                  "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": wd}},
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": 500_000,
                                        "stage3_prefetch_bucket_size": 500_000}}
        if offload:
            config["zero_optimization"]["offload_optimizer"] = offload_config
        if variant == "nvme":
            config["zero_optimization"]["sub_group_size"] = int(os.environ.get("BENCH_SUB_GROUP", "1000000"))
            config["aio"] = aio
        client = None
        if variant == "client":  # the user's torch AdamW, passed to initialize
            del config["optimizer"]
            client = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        engine, *_ = zeal.initialize(model=model, config=config, optimizer=client)
        from harness import zeal_step_and_sync

        step, sync = zeal_step_and_sync(engine)
    else:
        torch_dist_init(rank, world)
        import torch.distributed as dist

        base = rss_bytes()
        torch.manual_seed(0)
        model = GPT(VOCAB, block=BLOCK)
        if impl == "deepspeed":
            import deepspeed

            config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": clip,
                      "steps_per_print": 10**9, "zero_allow_untested_optimizer": True,
                      "zero_optimization": {"stage": stage, "reduce_bucket_size": 500_000,
                                            "stage3_prefetch_bucket_size": 500_000}}
            if offload:  # DeepSpeed then builds its own DeepSpeedCPUAdam from the config
                config["zero_optimization"]["offload_optimizer"] = offload_config
                if variant == "nvme":
                    config["zero_optimization"]["sub_group_size"] = int(os.environ.get("BENCH_SUB_GROUP", "1000000"))
                    config["aio"] = aio
                config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": wd}}
                engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                                  dist_init_required=False)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
                engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                  dist_init_required=False)

            def step(x, y):
                engine.backward(engine(x, y))
                engine.step()
        elif impl == "zero_redundancy":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(model)
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=lr,
                                          weight_decay=wd)
            step = torch_step(ddp, model, opt, clip)
        elif impl == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
            step = torch_step(model, model, opt, clip)
        else:
            raise SystemExit(f"unknown impl {impl}")

        def sync():
            dist.barrier()
    from harness import time_steps

    times = time_steps(step, batches, steps, sync)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": impl + ("+" + variant if variant else ""), "stage": stage, "rank": rank, "times_s": times,
                      "peak_growth": peak - base}),
          flush=True)
    if impl != "zeal":
        dist.destroy_process_group()


PLAN = [("zeal", 1), ("zero_redundancy", 1), ("deepspeed", 1),
        ("zeal", 2), ("deepspeed", 2),
        ("zeal", 3), ("fsdp2", 3), ("deepspeed", 3)]
OFFLOAD_PLAN = [(impl, stage) for stage in (1, 2, 3) for impl in ("zeal+offload", "zeal", "deepspeed+offload")]
CLIENT_PLAN = [("zeal", 1), ("zeal+client", 1), ("zero_redundancy", 1), ("deepspeed", 1),
               ("zeal", 2), ("zeal+client", 2), ("deepspeed", 2),
               ("zeal", 3), ("zeal+client", 3), ("fsdp2", 3), ("deepspeed", 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/bench/zero_vs_peers.json")
    ap.add_argument("--only", nargs="*", default=None, help="implementations to run, e.g. zeal deepspeed")
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload (optimizer on the CPU) instead")
    ap.add_argument("--client", action="store_true", help="Zeal's AdamW against the user's torch AdamW (client path)")
    ap.add_argument("--rank_impl", help=argparse.SUPPRESS)
    ap.add_argument("--rank_stage", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_impl:
        rank_main(args.rank_impl, args.rank_stage, args.steps, args.micro, clip=1.0)
        return

    plan = OFFLOAD_PLAN if args.offload else CLIENT_PLAN if args.client else PLAN
    title = (f"ZeRO{'-Offload' if args.offload else ''} vs peers: demo GPT (3.2M params), {args.ranks} ranks, "
             f"micro batch {args.micro} x {BLOCK} tokens, fp32 AdamW, CPU")
    run_plan(plan, args, title, "client_optimizer" if args.client else "zero_vs_peers", __file__)


def run_plan(plan, args, title, name, script):
    """Runs each (impl, stage) of the plan under mpirun, args.rounds times in rotation; prints a
    table with the first implementation of each stage as the base of the ratios and writes JSON."""
    from harness import mpirun, print_table, write_json

    if importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed is not installed (scripts/install-bench-deps): its rows are skipped")
        plan = [p for p in plan if not p[0].startswith("deepspeed")]
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    os.environ["DS_ACCELERATOR"] = "cpu"
    times = {p: [] for p in plan}
    peaks = {p: [] for p in plan}
    port = 29700
    for r in range(args.rounds):  # alternate implementations so drift hits all of them alike
        for impl, stage in plan:
            port += 1
            os.environ["BENCH_PORT"] = str(port)
            print(f"{name}: round {r + 1}, {impl} stage {stage} ...", flush=True)
            out = mpirun(args.ranks, sys.executable, script, "--rank_impl", impl, "--rank_stage", stage,
                         "--steps", args.steps, "--micro", args.micro, timeout=900)
            # Ranks print concurrently and mpirun may interleave their lines: find whole records.
            records = [json.loads(m) for m in re.findall(r'\{"impl"[^{}]*\}', out)]
            assert len(records) == args.ranks, out
            times[(impl, stage)] += next(x["times_s"] for x in records if x["rank"] == 0)
            peaks[(impl, stage)].append(max(x["peak_growth"] for x in records))
    summary, rows = {}, []
    for stage in sorted({s for _, s in plan}):
        base = next(p for p in plan if p[1] == stage)  # Zeal's row comes first in each stage
        zeal_ms = statistics.median(times[base]) * 1e3
        zeal_mb = max(peaks[base]) / 2**20
        for impl, s in plan:
            if s != stage:
                continue
            ms = statistics.median(times[(impl, s)]) * 1e3
            mb = max(peaks[(impl, s)]) / 2**20
            summary[f"{impl}/stage{s}"] = {"median_step_ms": ms, "peak_rss_growth_mib": mb}
            rows.append([s, impl, f"{ms:.1f}", f"{zeal_ms / ms:.2f}", f"{mb:.0f}", f"{zeal_mb / mb:.2f}"])
    print_table(title, ["stage", "impl", "median step ms", f"{plan[0][0]}/this time", "peak RSS growth MiB",
                        f"{plan[0][0]}/this mem"], rows)
    write_json(args.out, {"benchmark": name, "ranks": args.ranks, "micro": args.micro,
                          "summary": summary, "times_s": {f"{k[0]}/stage{k[1]}": v for k, v in times.items()},
                          "peak_growth": {f"{k[0]}/stage{k[1]}": v for k, v in peaks.items()}})

if __name__ == "__main__":
    main()
