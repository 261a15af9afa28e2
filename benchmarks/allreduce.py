"""Bus bandwidth of Zeal's MPI backend against raw MPI at the same sizes and rank count, in the same
processes (benchmarks/cpp/allreduce_bench.cpp): all_reduce against MPI_Allreduce (busbw = algbw *
2(n-1)/n), all_gather and reduce_scatter against MPI_Allgather and MPI_Reduce_scatter_block, and
all_to_all_v, the uneven all_to_all, against MPI_Alltoallv with the same split sizes (busbw = algbw *
(n-1)/n; bytes = nccl-tests' size: the all_gather output, the reduce_scatter input, what each rank
sends in an all_to_all).

    python benchmarks/allreduce.py --ranks 2 --max_bytes 67108864 --out out/bench/allreduce.json
    python benchmarks/allreduce.py --ranks 2 --op all_to_all_v --out out/bench/all_to_all_v.json
    python benchmarks/allreduce.py --ranks 4 --op all --max_bytes 4194304   # every op, one table each
"""
import argparse

from harness import BUILD, json_lines, mpirun, print_table, write_json


OPS = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all_v"]
WHAT = {"all_reduce": "all_reduce float32 sum", "all_gather": "all_gather float32",
        "reduce_scatter": "reduce_scatter float32 sum", "all_to_all_v": "all_to_all with uneven splits, float32"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max_bytes", type=int, default=64 << 20)
    ap.add_argument("--op", choices=OPS + ["all"], default="all_reduce")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ops = OPS if args.op == "all" else [args.op]
    if args.out is None:
        args.out = "out/bench/allreduce.json" if args.op == "all_reduce" else f"out/bench/{args.op}.json"
    exe = BUILD / "benchmarks" / "zeal_allreduce_bench"
    results = []
    for op in ops:
        rows_of_op = json_lines(mpirun(args.ranks, exe, args.max_bytes, op))
        results += rows_of_op
        print_op_table(op, args.ranks, rows_of_op)
    write_json(args.out, {"benchmark": args.op, "ranks": args.ranks, "results": results})


def print_op_table(op, ranks, results):
    by_size = {}
    for r in results:
        by_size.setdefault(r["bytes"], {})[r["impl"]] = r
    rows = []
    for size, impls in sorted(by_size.items()):
        mpi, zeal, nosig, queued = (impls[k] for k in ("mpi", "zeal", "zeal_nosig", "zeal_queued"))
        rows.append([size, f"{mpi['time_us']:.1f}", f"{zeal['time_us']:.1f}", f"{nosig['time_us']:.1f}",
                     f"{queued['time_us']:.1f}", f"{mpi['busbw_GBps']:.3f}", f"{zeal['busbw_GBps']:.3f}",
                     f"{zeal['busbw_GBps'] / mpi['busbw_GBps']:.2f}"])
    print_table(f"{WHAT[op]}, {ranks} ranks (min of 3 rounds); zeal as in training (signatures checked, "
                "small ops run by the caller), zeal_nosig without the signature check, zeal_queued with every "
                "op handed to the progress thread",
                ["bytes", "mpi us", "zeal us", "zeal_nosig us", "zeal_queued us", "mpi busbw GB/s",
                 "zeal busbw GB/s", "zeal/mpi"], rows)


if __name__ == "__main__":
    main()
