"""The MoE layer against DeepSpeed's, in one run: forward + backward of one MoE layer (the same
expert MLP, experts, k, capacity and tokens) on N CPU ranks at expert-parallel sizes 1 and N,
top-1 and top-2. For each: tokens per second per rank (median step) and the peak resident-memory
growth per rank (peak RSS while stepping minus RSS before the layer is built, max over ranks).

    Zeal        zeal.moe.layer.MoE, all_to_all over Zeal's MPI communicator
    DeepSpeed   deepspeed.moe.layer.MoE (DS_ACCELERATOR=cpu), all_to_all over torch's gloo
    Zeal dropless (dropless=True: only the routed rows travel, uneven all_to_all; the experts one
    after another) against DeepSpeed's drop_tokens=False (every expert's buffer padded to the
    largest load), and Zeal dropless with the experts as two grouped GEMMs (zeal-grouped)

Both layers get the same weights (DeepSpeed's state dict loaded into Zeal's, the names being the
same) and the same batches, so they route the same tokens.

    scripts/install-bench-deps     # DeepSpeed, pinned (its rows are skipped without it)
    python benchmarks/moe.py --ranks 2 --steps 20 --out out/bench/moe.json
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
from harness import rss_bytes, time_steps  # noqa: E402

HIDDEN, FFN, EXPERTS, TOKENS = 256, 1024, 8, 2048


def rank_main(impl, ep, k, steps):
    import torch

    impl, _, variant = impl.partition("-")

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randn(TOKENS, HIDDEN, generator=g) for _ in range(4)]
    kwargs = dict(num_experts=EXPERTS, ep_size=ep, k=k, capacity_factor=1.25, min_capacity=4)
    if variant:  # no token dropped: Zeal's dropless dispatch, DeepSpeed's padded drop_tokens=False
        kwargs["drop_tokens"] = False
        if impl == "zeal":
            kwargs["dropless"] = True
    if impl == "zeal":
        import zeal
        from zeal.moe.layer import MoE

        world_comm = zeal.world()
        base = rss_bytes()
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN))
        layer = MoE(HIDDEN, expert, **kwargs)
        layer.deepspeed_moe.grouped_gemm = variant == "grouped"

        def sync():
            world_comm.barrier().wait()
    else:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BENCH_PORT"])
        deepspeed.init_distributed("gloo", verbose=False)
        base = rss_bytes()
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN))
        layer = MoE(HIDDEN, expert, **kwargs)
        layer.set_deepspeed_parallelism()

        def sync():
            dist.barrier()
    # The same weights on both sides: each rank's local experts seeded by their global id.
    torch.manual_seed(1)
    layer.deepspeed_moe.gate.wg.weight.data.normal_(std=0.02)
    first = (rank % ep) * (EXPERTS // ep)
    for i, e in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        torch.manual_seed(100 + first + i)
        for p in e.parameters():
            p.data.normal_(std=0.02)

    def step(x):
        x = x.requires_grad_(True)
        out, l_aux, _ = layer(x)
        (out.square().mean() + 0.01 * l_aux).backward()
        layer.zero_grad(set_to_none=True)

    times = time_steps(step, [(x,) for x in batches], steps, sync)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    name = impl + ("-" + variant if variant else "")
    print(json.dumps({"impl": name, "ep": ep, "k": k, "rank": rank, "times_s": times, "peak_growth": peak - base}),
          flush=True)
    if impl == "deepspeed":
        import torch.distributed as dist

        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="out/bench/moe.json")
    ap.add_argument("--rank_impl")
    ap.add_argument("--rank_ep", type=int)
    ap.add_argument("--rank_k", type=int)
    args = ap.parse_args()
    if args.rank_impl:
        return rank_main(args.rank_impl, args.rank_ep, args.rank_k, args.steps)

    from harness import mpirun, print_table, write_json

    impls = ["zeal", "deepspeed", "zeal-dropless", "deepspeed-nodrop", "zeal-grouped"]
    if importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed is not installed (scripts/install-bench-deps): its rows are skipped")
        impls = ["zeal", "zeal-dropless", "zeal-grouped"]
    os.environ["DS_ACCELERATOR"] = "cpu"
    plan = [(impl, ep, k) for k in (1, 2) for ep in (1, args.ranks) for impl in impls]
    times = {p: [] for p in plan}
    peaks = {p: [] for p in plan}
    port = 29800
    for r in range(args.rounds):  # alternate implementations so drift hits all of them alike
        for impl, ep, k in plan:
            port += 1
            os.environ["BENCH_PORT"] = str(port)
            print(f"moe: round {r + 1}, {impl} ep {ep} top-{k} ...", flush=True)
            out = mpirun(args.ranks, sys.executable, __file__, "--rank_impl", impl, "--rank_ep", ep, "--rank_k", k,
                         "--steps", args.steps, timeout=900)
            records = [json.loads(m) for m in re.findall(r'\{"impl"[^{}]*\}', out)]
            assert len(records) == args.ranks, out
            times[(impl, ep, k)] += next(x["times_s"] for x in records if x["rank"] == 0)
            peaks[(impl, ep, k)].append(max(x["peak_growth"] for x in records))
    rows, summary = [], {}
    for impl, ep, k in plan:
        ms = statistics.median(times[(impl, ep, k)]) * 1e3
        mb = max(peaks[(impl, ep, k)]) / 2**20
        base = "zeal-dropless" if "-" in impl else "zeal"  # each pair against Zeal's row of its kind
        base_ms = statistics.median(times[(base, ep, k)]) * 1e3
        base_mb = max(peaks[(base, ep, k)]) / 2**20
        summary[f"{impl}/ep{ep}/top{k}"] = {"median_step_ms": ms, "tokens_per_s_per_rank": TOKENS / ms * 1e3,
                                             "peak_rss_growth_mib": mb}
        rows.append([f"top-{k}", ep, impl, f"{ms:.1f}", f"{TOKENS / ms * 1e3:,.0f}", f"{ms / base_ms:.2f}",
                     f"{mb:.0f}", f"{mb / base_mb:.2f}"])
    print_table(f"MoE layer forward+backward, {args.ranks} ranks, {EXPERTS} experts of {HIDDEN}->{FFN}->{HIDDEN}, "
                f"{TOKENS} tokens per rank, capacity factor 1.25, {os.cpu_count()} CPUs",
                ["gating", "ep", "impl", "median step ms", "tokens/s/rank", "time / zeal's", "peak RSS growth MiB",
                 "mem / zeal's"], rows)
    write_json(args.out, {"benchmark": "moe", "ranks": args.ranks, "tokens": TOKENS, "hidden": HIDDEN, "ffn": FFN,
                          "experts": EXPERTS, "summary": summary,
                          "times_s": {f"{i}/ep{e}/top{k}": v for (i, e, k), v in times.items()}})


if __name__ == "__main__":
    main()
