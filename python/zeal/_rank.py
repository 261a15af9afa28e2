"""What each rank runs under the zeal launcher.

It sets the torchrun-style variables from mpirun's, prefixes every line this process writes to
stdout or stderr with "[rankN]: " (at the file-descriptor level, so C++ and child-process output
is prefixed too), runs the user's script as __main__, and on failure writes one marker line that
the launcher turns into "rank N failed with exit code C".
"""
import os
import re
import runpy
import sys
import threading
import traceback

FAILURE_MARKER = "ZEAL-RANK-FAILED"

# What a failed collective says about whose fault it was (messages of src/comm/mpi_backend.cpp:
# Note [Collective signatures]). The launcher's final line names that rank, not the reporter.
_DIVERGED = re.compile(r"collective mismatch on group (\S+): the ranks disagree about op #(\d+):.*"
                       r"\[diverged: world ranks ([\d, ]+?)(?: or ([\d, ]+))?\]")
_MISSING = re.compile(r"(\w+ #\d+ on group \S+) .*?ranks that did not arrive: \[[\d, ]*\] "
                      r"\(world ranks \[([\d, ]+)\]\)")


def culprit(message):
    """'world rank 1 diverged at op #12 on group world' or 'world rank 2 never arrived at all_reduce
    #3 on group world' from a collective's error message; None when it names no culprit."""
    m = _DIVERGED.search(message)
    if m:
        group, op, first, second = m.groups()
        who = f"world rank {first}" if "," not in first else f"world ranks {first}"
        if second:
            who = f"world ranks {first} or {second}"
        return f"{who} diverged at op #{op} on group {group}"
    m = _MISSING.search(message)
    if m:
        op, ranks = m.groups()
        return f"world rank{'s' if ',' in ranks else ''} {ranks} never arrived at {op}"
    return None


def _export_rank_variables():
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE (and torchrun's LOCAL_WORLD_SIZE) from whichever
    starter ran this process: mpirun (OMPI_COMM_WORLD_*), srun (SLURM_*), or the zeal node agent
    and torchrun (already set)."""
    env = os.environ

    def first(*names, default):
        return next((env[n] for n in names if n in env), default)

    env["RANK"] = first("OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "RANK", default="0")
    env["WORLD_SIZE"] = first("OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "WORLD_SIZE", default="1")
    env["LOCAL_RANK"] = first("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK", default="0")
    local_size = first("OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", default=None)
    if local_size is None and "SLURM_TASKS_PER_NODE" in env:  # "2(x3)" or "2,1": this node's count first
        local_size = re.match(r"\d+", env["SLURM_TASKS_PER_NODE"]).group(0)
    env["LOCAL_SIZE"] = env["LOCAL_WORLD_SIZE"] = local_size or "1"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    # The devices of this node that the launcher gave this rank (--include host:slots), by local rank.
    slots = env.get("ZEAL_NODE_SLOTS")
    if slots and "CUDA_VISIBLE_DEVICES" not in env:
        picked = slots.split(",")
        if int(env["LOCAL_RANK"]) < len(picked):
            env["CUDA_VISIBLE_DEVICES"] = picked[int(env["LOCAL_RANK"])]


class _PrefixedFd:
    """Points fd at a pipe whose lines a thread copies, prefixed, to fd's original target (or to
    the file descriptor `target`)."""

    def __init__(self, fd, prefix, target=None):
        self.fd = fd
        self.real = os.dup(fd) if target is None else os.dup(target)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end, prefix.encode()), daemon=True)
        self.thread.start()

    def _pump(self, read_end, prefix):
        with os.fdopen(read_end, "rb") as src:
            for line in src:
                os.write(self.real, prefix + line)

    def close(self):
        os.close(self.fd)  # the pump sees end of file once every writer is gone
        self.thread.join(timeout=5)


def _finish(code, streams, marker_fd, blame=None):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    for s in streams:
        s.close()
    if code != 0:
        line = f"{FAILURE_MARKER} rank {os.environ['RANK']} exit code {code}"
        if blame:
            line += f" culprit {blame}"
        os.write(marker_fd, (line + "\n").encode())
    os._exit(code)


def main():
    if len(sys.argv) < 2:
        print("usage: python -m zeal._rank script.py [args]", file=sys.stderr)
        sys.exit(2)
    _export_rank_variables()
    rank = os.environ["RANK"]
    sys.stdout.flush()
    sys.stderr.flush()
    marker_fd = os.dup(2)  # the launcher reads failure markers here, also when output goes to --log_dir
    log_dir = os.environ.get("ZEAL_LOG_DIR")
    if log_dir:  # --log_dir: this rank's output goes to its own file, unprefixed
        os.makedirs(log_dir, exist_ok=True)
        log = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        streams = [_PrefixedFd(1, "", target=log), _PrefixedFd(2, "", target=log)]
    else:
        prefix = f"[rank{rank}]: "
        streams = [_PrefixedFd(1, prefix), _PrefixedFd(2, prefix)]
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    if os.environ.get("ZEAL_PASS_LOCAL_RANK") == "1":  # as the deepspeed launcher does (--no_local_rank: off)
        sys.argv.append(f"--local_rank={os.environ['LOCAL_RANK']}")
    if not os.path.isfile(script):
        print(f"zeal: the training script {script!r} does not exist (working directory {os.getcwd()})",
              file=sys.stderr)
        _finish(2, streams, marker_fd)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    blame = None
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # noqa: B902 - any failure of the user's script is this rank's failure
        traceback.print_exc()
        code = 1
        blame = culprit(str(e).replace("\n", " "))
    if code == 0:
        zeal = sys.modules.get("zeal")
        if zeal is not None:
            zeal._zeal.shutdown()
    _finish(code, streams, marker_fd, blame)


if __name__ == "__main__":
    main()
