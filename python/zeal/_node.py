"""The node agent: what the ssh and pdsh launchers start once on every host.

It starts this node's ranks (`python -m zeal._rank`, each in its own process group, with RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT set; the ranks meet through the
MASTER_ADDR rendezvous, docs/architecture.md) and watches them:

  a. a rank that exits non-zero or is killed: the others are stopped (SIGTERM to their process
     groups, SIGKILL 3 s later), one line names the rank, the host and the exit code or signal,
     and the agent exits non-zero;
  b. SIGINT / SIGTERM / SIGHUP to the agent: every rank is stopped the same way;
  c. the launcher or its connection is gone, which ssh and pdsh without a terminal do not signal:
     the agent watches its stdout for a hang-up (the connection's pipe closed: ssh and pdsh) and,
     with --watch_stdin (ssh, whose launcher keeps it open), its stdin for end of file; either
     stops every rank the same way.
So no rank outlives its agent, and the agent never outlives its launcher.
"""
import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from ._rank import FAILURE_MARKER

GRACE_S = 3.0


def stop(children):
    """SIGTERM every live child's process group, SIGKILL what is left after GRACE_S."""
    live = [c for c in children if c.poll() is None]
    for c in live:
        try:
            os.killpg(c.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_S
    while any(c.poll() is None for c in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for c in live:
        try:
            os.killpg(c.pid, signal.SIGKILL)  # the group: also whatever the rank started
        except ProcessLookupError:
            pass
        c.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m zeal._node")
    ap.add_argument("--node_rank", type=int, required=True)
    ap.add_argument("--node_sizes", required=True, help="ranks per node, comma-separated, in node order")
    ap.add_argument("--node_slots", default="", help="this node's slots (device indices), comma-separated")
    ap.add_argument("--watch_stdin", action="store_true")
    ap.add_argument("script")
    ap.add_argument("script_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.node_sizes.split(",")]
    base, local_size, world = sum(sizes[:args.node_rank]), sizes[args.node_rank], sum(sizes)
    host = socket.gethostname()

    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.signum = signum
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.watch_stdin:
        def watch_stdin():
            while sys.stdin.buffer.read(1 << 16):
                pass
            stopping.set()
        threading.Thread(target=watch_stdin, daemon=True).start()

    def watch_stdout():
        hangup = select.poll()
        hangup.register(sys.stdout.fileno(), select.POLLHUP | select.POLLERR)
        while not stopping.is_set():
            if hangup.poll(200):
                stopping.set()
    if not os.isatty(sys.stdout.fileno()):
        threading.Thread(target=watch_stdout, daemon=True).start()

    children = []
    for local in range(local_size):
        env = dict(os.environ, RANK=str(base + local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   LOCAL_SIZE=str(local_size), LOCAL_WORLD_SIZE=str(local_size), ZEAL_NODE_SLOTS=args.node_slots)
        children.append(subprocess.Popen([sys.executable, "-u", "-m", "zeal._rank", args.script, *args.script_args],
                                         env=env, stdin=subprocess.DEVNULL, start_new_session=True))
    while True:
        if stopping.is_set():
            stop(children)
            print(f"zeal: node {args.node_rank} ({host}): stopped its ranks on request", file=sys.stderr, flush=True)
            return 128 + getattr(stopping, "signum", signal.SIGINT)  # 130 Ctrl-C, 143 SIGTERM, 129 hang-up
        done = [(i, c.returncode) for i, c in enumerate(children) if c.poll() is not None]
        failed = [(i, rc) for i, rc in done if rc != 0]
        if failed:
            local, rc = failed[0]
            rank = base + local
            if rc < 0:  # killed by a signal: the rank could not report itself
                what = f"was killed by signal {signal.Signals(-rc).name}"
                print(f"{FAILURE_MARKER} rank {rank} exit code {128 - rc}", file=sys.stderr, flush=True)
            else:
                what = f"exited with code {rc}"
            print(f"zeal: rank {rank} on {host} {what}; stopping the other ranks of this node", file=sys.stderr,
                  flush=True)
            stop(children)
            return rc if rc > 0 else 128 - rc
        if len(done) == len(children):
            return 0
        time.sleep(0.05)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: the stdin watcher may be blocked in a read, which finalization would trip on
