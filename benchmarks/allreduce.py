"""Bus bandwidth of Zeal's MPI backend against raw MPI at the same sizes and rank count, in the same
processes (benchmarks/cpp/allreduce_bench.cpp): all_reduce against MPI_Allreduce (busbw = algbw *
2(n-1)/n), or --op all_to_all_v, the uneven all_to_all against MPI_Alltoallv with the same split
sizes (busbw = algbw * (n-1)/n; bytes = what each rank sends).

    python benchmarks/allreduce.py --ranks 2 --max_bytes 67108864 --out out/bench/allreduce.json
    python benchmarks/allreduce.py --ranks 2 --op all_to_all_v --out out/bench/all_to_all_v.json
"""
import argparse

from harness import BUILD, json_lines, mpirun, print_table, write_json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max_bytes", type=int, default=64 << 20)
    ap.add_argument("--op", choices=["all_reduce", "all_to_all_v"], default="all_reduce")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or ("out/bench/allreduce.json" if args.op == "all_reduce" else f"out/bench/{args.op}.json")
    exe = BUILD / "benchmarks" / "zeal_allreduce_bench"
    results = json_lines(mpirun(args.ranks, exe, args.max_bytes, args.op))
    by_size = {}
    for r in results:
        by_size.setdefault(r["bytes"], {})[r["impl"]] = r
    rows = []
    for size, pair in sorted(by_size.items()):
        mpi, zeal, nosig = pair["mpi"], pair["zeal"], pair["zeal_nosig"]
        rows.append([size, f"{mpi['time_us']:.1f}", f"{zeal['time_us']:.1f}", f"{nosig['time_us']:.1f}",
                     f"{zeal['time_us'] - nosig['time_us']:+.1f}", f"{mpi['busbw_GBps']:.3f}",
                     f"{zeal['busbw_GBps']:.3f}", f"{zeal['busbw_GBps'] / mpi['busbw_GBps']:.2f}"])
    what = "all_reduce float32 sum" if args.op == "all_reduce" else "all_to_all with uneven splits, float32"
    print_table(f"{what}, {args.ranks} ranks (min of 3 rounds); zeal checks collective signatures, "
                "zeal_nosig is the same without the check",
                ["bytes", "mpi us", "zeal us", "zeal_nosig us", "check us", "mpi busbw GB/s", "zeal busbw GB/s",
                 "zeal/mpi"], rows)
    write_json(args.out, {"benchmark": args.op, "ranks": args.ranks, "results": results})


if __name__ == "__main__":
    main()
