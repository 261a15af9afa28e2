"""`zeal --num_procs N script.py [args]`: start N ranks on this node.

The ranks are started through `mpirun` so that they form one MPI world (the host collectives
need it; see docs/architecture.md). Each rank runs `python -m zeal._rank script.py args`, which
sets the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), prefixes each line of its output with "[rankN]: " and reports a failure with its
rank and exit code. When a rank fails, mpirun stops the others and the launcher exits with that
rank's code, naming it.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

from ._rank import FAILURE_MARKER

_MARKER = re.compile(re.escape(FAILURE_MARKER) + r" rank (\d+) exit code (-?\d+)")
_MPI_RANK = re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]|process rank (\d+) with PID")


def local_mpi_env(base=None):
    """An environment for running ranks under mpirun on this node: as root if need be,
    oversubscribing the cores, Open MPI talking over loopback only."""
    env = dict(os.environ if base is None else base)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_oob_tcp_if_include="lo",
               OMPI_MCA_btl_tcp_if_include="lo")
    return env


def build_command(num_procs, script, script_args):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("zeal: mpirun was not found; run scripts/install-deps (Open MPI) first")
    # One node: the ranks and mpirun talk over loopback only.
    cmd = [mpirun, "-np", str(num_procs), "--oversubscribe", "--bind-to", "none",
           "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_tcp_if_include", "lo"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "PYTHONUNBUFFERED"):
        if var in os.environ:
            cmd += ["-x", var]
    return cmd + [sys.executable, "-u", "-m", "zeal._rank", script] + list(script_args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="zeal", description="Start a Zeal training script on N ranks of this node.")
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
    cmd = build_command(args.num_procs, args.script, args.script_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True)

    def forward_signal(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward_signal)
    signal.signal(signal.SIGTERM, forward_signal)

    failed, mpi_named, lock = [], [], threading.Lock()

    def pump(src, dst):
        for line in src:
            marker = _MARKER.search(line)
            if marker:
                with lock:
                    failed.append((int(marker.group(1)), int(marker.group(2))))
                continue
            if not line.startswith("[rank"):
                named = _MPI_RANK.search(line)
                if named:
                    with lock:
                        mpi_named.append(int(named.group(1) or named.group(2)))
            dst.write(line)
            dst.flush()

    threads = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout)),
               threading.Thread(target=pump, args=(proc.stderr, sys.stderr))]
    for t in threads:
        t.start()
    code = proc.wait()
    for t in threads:
        t.join()
    if failed:
        rank, rank_code = failed[0]
        print(f"zeal: rank {rank} failed with exit code {rank_code}; the other ranks were stopped", file=sys.stderr)
        return rank_code or 1
    if code != 0:
        who = f"rank {mpi_named[0]}" if mpi_named else "a rank"
        print(f"zeal: {who} failed (mpirun exit code {code}); the other ranks were stopped", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
