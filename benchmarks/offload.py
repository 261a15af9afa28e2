"""ZeRO-Offload and ZeRO-Infinity step time, in one run: the demo model (char GPT, 3.2M parameters)
at N ranks on CPU, fp32 AdamW + clipping, the same data and micro batch for every row.

    zeal+nvme          offload_optimizer {device: nvme}: master weights and Adam state in swap files
                       under --nvme_path, pipelined reads and writes, sub-groups of --sub_group elements
    zeal+offload       offload_optimizer {device: cpu}
    zeal               no offload
    deepspeed+nvme     DeepSpeed's ZeRO-Infinity optimizer swap, same config (stage 3 only: DeepSpeed
                       swaps the optimizer to NVMe at stage 3 only); needs its async_io op
    deepspeed+offload  DeepSpeed's ZeRO-Offload (DeepSpeedCPUAdam)

Ratios are Zeal+NVMe's time and memory over each row's. The swap files live on --nvme_path (this
machine: a virtual disk, not an NVMe device; benchmarks/aio.py measures it).

    scripts/install-bench-deps     # DeepSpeed, pinned (optional; its rows are skipped without it)
    python benchmarks/offload.py --ranks 2 --steps 10 --nvme_path /work/nvme-bench
"""
import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import zero_vs_peers  # noqa: E402

PLAN = ([(impl, stage) for stage in (1, 2) for impl in ("zeal+nvme", "zeal+offload", "zeal", "deepspeed+offload")]
        + [("zeal+nvme", 3), ("zeal+offload", 3), ("zeal", 3), ("deepspeed+nvme", 3), ("deepspeed+offload", 3)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nvme_path", default="/work/nvme-bench")
    ap.add_argument("--sub_group", type=int, default=1_000_000, help="zero_optimization.sub_group_size")
    ap.add_argument("--out", default="out/bench/offload.json")
    ap.add_argument("--only", nargs="*", default=None, help="implementations to run, e.g. zeal+nvme deepspeed+nvme")
    ap.add_argument("--rank_impl", help=argparse.SUPPRESS)
    ap.add_argument("--rank_stage", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_impl:
        zero_vs_peers.rank_main(args.rank_impl, args.rank_stage, args.steps, args.micro, clip=1.0)
        return
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_NVME_PATH"] = str(Path(args.nvme_path).resolve())
    os.environ["BENCH_SUB_GROUP"] = str(args.sub_group)
    title = (f"Offload: demo GPT (3.2M params), {args.ranks} ranks, micro batch {args.micro} x "
             f"{zero_vs_peers.BLOCK} tokens, fp32 AdamW, CPU; NVMe rows swap to {args.nvme_path}")
    zero_vs_peers.run_plan(PLAN, args, title, "offload", __file__)


if __name__ == "__main__":
    main()
