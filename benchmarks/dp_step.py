"""Data-parallel step time of the demo model (char GPT, 3.2M parameters) at N ranks: Zeal against
torch DDP (gloo backend, fused CPU AdamW where torch has it) in the same run, same data sizes.

    python benchmarks/dp_step.py --ranks 2 --steps 30 --out out/bench/dp_step.json

Each implementation runs in alternating rounds; the table reports the median step time of each
(the mean over ranks is not needed: a data-parallel step ends in a collective, so ranks agree).
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "python"))


def rank_main(impl, steps, micro, clip):
    import torch

    from gpt import GPT

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["OMPI_COMM_WORLD_SIZE"])))
    torch.manual_seed(0)
    vocab, block = 96, 128
    model = GPT(vocab, block=block)
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, vocab, (micro, block), generator=g), torch.randint(0, vocab, (micro, block), generator=g))
               for _ in range(4)]
    if impl.startswith("zeal"):
        import zeal

        config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": clip, "steps_per_print": 10**9,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
                  "zero_optimization": {"stage": 0, "reduce_bucket_size": 500000}}
        engine, *_ = zeal.initialize(model=model, config=config)
        if impl == "zeal_nosig":  # the cost of Note [Collective signatures]: the same run without the check
            zeal._zeal.set_signature_checks(False)
        from harness import zeal_step_and_sync

        step, sync = zeal_step_and_sync(engine)
    else:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['BENCH_PORT']}", rank=rank,
                                world_size=world)
        ddp = DDP(model)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)

        def step(x, y):
            loss = ddp(x, y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()

        def sync():
            dist.barrier()
    from harness import time_steps

    times = time_steps(step, batches, steps, sync)
    if rank == 0:
        print(json.dumps({"impl": impl, "ranks": world, "micro": micro, "times_s": times}), flush=True)
    if impl == "ddp":
        import torch.distributed as dist

        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/bench/dp_step.json")
    ap.add_argument("--rank_impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_impl:
        rank_main(args.rank_impl, args.steps, args.micro, clip=1.0)
        return

    from harness import json_lines, mpirun, print_table, write_json

    runs = {"zeal": [], "zeal_nosig": [], "ddp": []}
    port = 29611
    for r in range(args.rounds):
        for impl in ("ddp", "zeal", "zeal_nosig"):
            os.environ["BENCH_PORT"] = str(port + r)
            out = mpirun(args.ranks, sys.executable, __file__, "--rank_impl", impl, "--steps", args.steps,
                         "--micro", args.micro)
            runs[impl] += json_lines(out)[0]["times_s"]
    tokens = args.micro * args.ranks * 128
    rows, summary = [], {}
    for impl, times in runs.items():
        med = statistics.median(times)
        summary[impl] = {"median_step_ms": med * 1e3, "tokens_per_s": tokens / med,
                         "p10_ms": sorted(times)[len(times) // 10] * 1e3, "p90_ms": sorted(times)[9 * len(times) // 10] * 1e3}
        rows.append([impl, f"{med * 1e3:.1f}", f"{summary[impl]['p10_ms']:.1f}", f"{summary[impl]['p90_ms']:.1f}",
                     f"{tokens / med:,.0f}"])
    ratio = summary["zeal"]["median_step_ms"] / summary["ddp"]["median_step_ms"]
    print_table(f"data-parallel step, demo GPT (3.2M params), {args.ranks} ranks, micro batch {args.micro} x 128 tokens",
                ["impl", "median ms", "p10 ms", "p90 ms", "tokens/s"], rows)
    check = summary["zeal"]["median_step_ms"] / summary["zeal_nosig"]["median_step_ms"] - 1
    print(f"zeal / ddp step time: {ratio:.3f}  (below 1 means Zeal is faster)")
    print(f"collective signature check: {check * 100:+.2f}% of the step (zeal against zeal_nosig)")
    write_json(args.out, {"benchmark": "dp_step", "ranks": args.ranks, "micro": args.micro, "summary": summary,
                          "zeal_over_ddp": ratio, "signature_check_fraction": check, "times_s": runs})


if __name__ == "__main__":
    main()
