"""Swap I/O throughput: Zeal's swap store against fio and dd on the same disk.

Each round moves the same number of bytes with each tool, in a rotating order (this machine's
disk is shared and noisy), with O_DIRECT everywhere:
  zeal  one swap file written whole and read back whole through Zeal's io_uring workers, with the
        checksums it always computes and verifies (benchmarks/cpp/aio_bench.cpp);
  fio   --ioengine=io_uring --direct=1, the same block size and queue depth, one job per Zeal
        I/O thread over its share of the file;
  dd    oflag=direct / iflag=direct, the same block size (queue depth 1: dd has no other).
Files are preallocated and written once before timing for every tool, so every timed write
overwrites written blocks, as training steps do (Zeal's first write, which also converts the
reserved extents, is reported apart as first_write). Reported: GB/s per
tool (median of rounds) and Zeal's ratio to fio.

    python3 benchmarks/aio.py --dir /work/aio-bench --size_gib 2 --rounds 3
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import BUILD, print_table, write_json


def zeal_once(binary, directory, size, block, depth, threads):
    out = subprocess.run([str(binary), str(directory), str(size), str(block), str(depth), str(threads), "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["op"]: r["bytes"] / r["seconds"] for r in rows}  # write, read and first_write


def fio_once(path, size, block, depth, jobs, op):
    per_job = size // jobs
    cmd = ["fio", "--name=zeal-bench", f"--filename={path}", f"--size={per_job}", f"--offset_increment={per_job}",
           f"--numjobs={jobs}", f"--bs={block}", f"--iodepth={depth}", f"--rw={op}", "--direct=1",
           "--ioengine=io_uring", "--group_reporting", "--output-format=json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    job = out["jobs"][0]
    return job["write" if op == "write" else "read"]["bw_bytes"]


def dd_once(path, size, block, op):
    count = size // block
    if op == "write":
        cmd = ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct", "conv=notrunc"]
    else:
        cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct"]
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return size / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work/aio-bench", help="a directory on the disk to measure")
    ap.add_argument("--size_gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="1048576:8:1,1048576:32:2",
                    help="block_size:queue_depth:threads, comma separated")
    ap.add_argument("--out", default="out/bench/aio.json")
    args = ap.parse_args()

    binary = BUILD / "benchmarks" / "zeal_aio_bench"
    if not binary.exists():
        sys.exit(f"{binary} is missing: run scripts/build first")
    for tool in ("fio", "dd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/install-deps installs fio)")
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // (1 << 20) * (1 << 20)
    peer_file = directory / "peer.dat"
    with open(peer_file, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    dd_once(peer_file, size, 1 << 20, "write")  # written once, like Zeal's file before its timed rounds

    results = []
    try:
        for config in args.configs.split(","):
            block, depth, threads = (int(v) for v in config.split(":"))
            samples = {(tool, op): [] for tool in ("zeal", "fio", "dd") for op in ("write", "read")}
            first_writes = []
            tools = ["zeal", "fio", "dd"]
            for r in range(args.rounds):
                for tool in tools[r % 3:] + tools[:r % 3]:
                    if tool == "zeal":
                        got = zeal_once(binary, directory, size, block, depth, threads)
                        for op in ("write", "read"):
                            samples[("zeal", op)].append(got[op])
                        first_writes.append(got["first_write"])
                    else:
                        for op in ("write", "read"):
                            value = (fio_once(peer_file, size, block, depth, threads, op) if tool == "fio"
                                     else dd_once(peer_file, size, block, op))
                            samples[(tool, op)].append(value)
                print(f"  config {config} round {r + 1}/{args.rounds} done", flush=True)
            for op in ("write", "read"):
                med = {tool: statistics.median(samples[(tool, op)]) for tool in ("zeal", "fio", "dd")}
                results.append({"block_size": block, "queue_depth": depth, "threads": threads, "op": op,
                                "zeal_gbps": med["zeal"] / 1e9, "fio_gbps": med["fio"] / 1e9,
                                "dd_gbps": med["dd"] / 1e9, "zeal_over_fio": med["zeal"] / med["fio"],
                                "samples_gbps": {t: [v / 1e9 for v in samples[(t, op)]] for t in ("zeal", "fio", "dd")},
                                "zeal_first_write_gbps": statistics.median(first_writes) / 1e9})
    finally:
        peer_file.unlink(missing_ok=True)

    rows = [[r["block_size"], r["queue_depth"], r["threads"], r["op"], f"{r['zeal_gbps']:.2f}", f"{r['fio_gbps']:.2f}",
             f"{r['dd_gbps']:.2f}", f"{r['zeal_over_fio']:.2f}"] for r in results]
    print_table(f"swap I/O, {size / (1 << 30):.1f} GiB per transfer, median of {args.rounds} rounds (GB/s)",
                ["block", "qd", "threads", "op", "zeal", "fio", "dd", "zeal/fio"], rows)
    write_json(args.out, {"size_bytes": size, "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
