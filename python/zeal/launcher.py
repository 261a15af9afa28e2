"""`zeal --num_procs N script.py [args]`: start N ranks on this node.

The ranks are started through `mpirun` so that they form one MPI world (the host collectives
need it; see docs/architecture.md). Each rank runs `python -m zeal._rank script.py args`, which
sets the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and reports a failure with its rank and exit code. The launcher prefixes every line
with its rank, and when a rank fails, mpirun stops the others and the launcher exits non-zero
naming the rank.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys

from ._rank import FAILURE_MARKER

_TAG = re.compile(r"^\[\d+,(\d+)\]<(stdout|stderr)>:(.*)$")
_MPI_RANK = re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]|rank (\d+) with PID")


def build_command(args, script_args):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("zeal: mpirun was not found; run scripts/install-deps (Open MPI) first")
    cmd = [mpirun, "-np", str(args.num_procs), "--oversubscribe", "--bind-to", "none", "--tag-output"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "ZEAL_LOG_LEVEL", "PYTHONUNBUFFERED"):
        cmd += ["-x", var]
    cmd += [sys.executable, "-u", "-m", "zeal._rank", args.script] + script_args
    return cmd


def main(argv=None):
    parser = argparse.ArgumentParser(prog="zeal", description="Start a Zeal training script on N ranks.")
    parser.add_argument("--num_procs", "--num_gpus", type=int, default=1, help="ranks to start on this node")
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("script", help="the Python training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.num_procs < 1:
        parser.error(f"--num_procs must be >= 1, got {args.num_procs}")

    os.environ["MASTER_ADDR"] = args.master_addr
    os.environ["MASTER_PORT"] = str(args.master_port)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("PYTHONPATH", "")
    cmd = build_command(args, args.script_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)

    def forward_signal(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward_signal)
    signal.signal(signal.SIGTERM, forward_signal)

    failed = []  # (rank, code) in the order reported
    mpi_named = None
    for line in proc.stdout:
        line = line.rstrip("\n")
        match = _TAG.match(line)
        if match:
            rank, stream, text = int(match.group(1)), match.group(2), match.group(3)
            if text.startswith(FAILURE_MARKER):
                failed.append((rank, int(text.split()[-1])))
                continue
            out = sys.stderr if stream == "stderr" else sys.stdout
            print(f"[rank{rank}]: {text}", file=out, flush=True)
        else:
            named = _MPI_RANK.search(line)
            if named and mpi_named is None:
                mpi_named = int(named.group(1) or named.group(2))
            print(f"[mpirun]: {line}", file=sys.stderr, flush=True)
    code = proc.wait()
    if failed:
        rank, rank_code = failed[0]
        print(f"zeal: rank {rank} failed with exit code {rank_code}; the other ranks were stopped", file=sys.stderr)
        return rank_code or 1
    if code != 0:
        who = f"rank {mpi_named}" if mpi_named is not None else "a rank"
        print(f"zeal: {who} failed (mpirun exit code {code}); the other ranks were stopped", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
