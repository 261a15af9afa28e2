"""Shared benchmark plumbing: run ranks, print a table, write JSON with the machine's facts."""
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from zeal.launcher import local_mpi_env

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "py"


def mpi_env():
    return local_mpi_env()


def mpirun(ranks, *cmd, timeout=600):
    full = [shutil.which("mpirun"), "--oversubscribe", "--bind-to", "none", "-np", str(ranks), *map(str, cmd)]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=mpi_env())
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(full)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def machine():
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def print_table(title, columns, rows):
    widths = [max(len(c), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")


def time_steps(step, batches, steps, sync, warmup=3):
    """Seconds per call of step(*batch), after `warmup` untimed calls, cycling through batches;
    sync() (a barrier) brackets the timed calls so every rank starts and ends together."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    sync()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(*batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    sync()
    return times


def zeal_step_and_sync(engine):
    """The step and barrier the timing loop needs, for a Zeal engine whose module returns the loss."""
    import zeal

    def step(x, y):
        engine.backward(engine(x, y))
        engine.step()

    def sync():
        zeal.world().barrier().wait()
    return step, sync


def rss_bytes():
    """This process's resident set size now (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class LinkedNamespaces:
    """Two network namespaces ("nodes") joined by a veth pair whose bandwidth tc can limit (token
    bucket): inside a namespace processes talk through its own stack, between them every byte crosses
    the link. Needs root (ip netns, tc). setup(rate) (re)creates them, "unlimited" for no limit;
    teardown() removes them. Address i is f"{subnet}.{i + 1}" on dev[i] in ns[i]."""

    def __init__(self, prefix, subnet):
        self.ns = [f"{prefix}{i}" for i in range(2)]
        self.dev = [f"{prefix}v{i}" for i in range(2)]
        self.subnet = subnet

    @staticmethod
    def sh(*cmd, check=True):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check)

    def teardown(self):
        for ns in self.ns:
            self.sh("ip", "netns", "del", ns, check=False)

    def setup(self, rate):
        self.teardown()
        for ns in self.ns:
            self.sh("ip", "netns", "add", ns)
        self.sh("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for i, (ns, dev) in enumerate(zip(self.ns, self.dev)):
            self.sh("ip", "link", "set", dev, "netns", ns)
            self.sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.subnet}.{i + 1}/24", "dev", dev)
            self.sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            self.sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if rate != "unlimited":
                self.sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", "256kb", "latency", "100ms")

    def run_ranks(self, script, args, world, port, label, timeout):
        """Starts `world` ranks of python `script` with `args`, the first half in namespace 0 and the
        rest in namespace 1 (each half one "node"), joined by Zeal's rendezvous at address 1 with Open
        MPI's TCP transport pinned to the veth; returns each rank's output. A rank that fails or a job
        past `timeout` s stops them all and exits naming `label`."""
        per_ns = world // 2
        procs = []
        for rank in range(world):
            ns, dev = self.ns[rank // per_ns], self.dev[rank // per_ns]
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % per_ns),
                   "LOCAL_SIZE": str(per_ns), "LOCAL_WORLD_SIZE": str(per_ns), "ZEAL_RANKS_PER_NODE": str(per_ns),
                   "MASTER_ADDR": f"{self.subnet}.1", "MASTER_PORT": str(port), "OMPI_MCA_btl": "self,tcp",
                   "OMPI_MCA_btl_tcp_if_include": dev, "OMPI_MCA_oob_tcp_if_include": dev,
                   "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
            cmd = ["ip", "netns", "exec", ns, sys.executable, str(script), *map(str, args)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                sys.exit(f"{label}: ranks did not finish")
            outs.append(out)
            if p.returncode != 0:
                for q in procs:
                    q.kill()
                sys.exit(f"{label}: a rank failed ({p.returncode}):\n{out[-4000:]}")
        return outs
