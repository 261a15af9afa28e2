"""`zeal [options] script.py [args]`: start a training script on the ranks of one or many hosts.

Options follow the `deepspeed` launcher's, so existing job scripts keep working (docs/launcher.md).
Where the ranks run comes from the hostfile and --include / --exclude / --num_nodes / --num_procs
(zeal/hosts.py); how they are started, from --launcher:

  local    one host: `mpirun` over loopback; the ranks form one MPI world
  openmpi  many hosts: one `mpirun -H host:slots,...`; one MPI world
  ssh      many hosts: one `ssh HOST` a node, each running the node agent (zeal/_node.py), which
           starts that node's ranks; they meet through the MASTER_ADDR rendezvous
  pdsh     as ssh, through one `pdsh -w HOST,...`
  slurm    one `srun`; the ranks read their numbers from SLURM_* and meet through the rendezvous

Every rank runs `python -m zeal._rank`, which sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
MASTER_ADDR, MASTER_PORT, prefixes its output with "[rankK]: " (or writes it to --log_dir), passes
--local_rank=K to the script unless --no_local_rank, and reports a failure as one marker line.

Failure (Note [No half-dead jobs]): the launcher watches every process it started. When one ends
non-zero, or a rank reports a failure, or the launcher gets SIGINT / SIGTERM, it stops all of them
(the ssh node agents stop their ranks when their connection closes) and exits non-zero, naming
the rank, its host and the exit code.
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from . import hosts as hostlib
from ._rank import FAILURE_MARKER

# DeepSpeed's name for the file of environment lines its multi-node launcher exports (Accelerate
# imports it; Zeal's launcher forwards the environment through mpirun instead).
DEEPSPEED_ENVIRONMENT_NAME = os.getenv("DS_ENV_FILE", ".deepspeed_env")

_MARKER = re.compile(re.escape(FAILURE_MARKER) + r" rank (\d+) exit code (-?\d+)(?: culprit (.+))?")

_MPI_RANK = re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]|process rank (\d+) with PID")
_MPI_RULE = re.compile(r"^-{20,}\s*$")
_MPI_AFTERMATH = re.compile(r"^\[[^\]]+:\d+\] \d+ more process(es)? ha(s|ve) sent help message|"
                            r"^\[[^\]]+:\d+\] Set MCA parameter|mpirun: Forwarding signal|"
                            r"^mpirun (noticed|detected)")
FORWARD_PREFIXES = ("NCCL", "PYTHON", "UCX", "OMPI", "ZEAL")
DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default location
LAUNCHERS = ("local", "openmpi", "ssh", "pdsh", "slurm")
STOP_GRACE_S = 5.0  # each stage of stopping: ask, SIGTERM, SIGKILL


def _definite(blame):
    """A culprit that names its ranks ("world rank 3 diverged ..."), not a pair only one of which
    can be ("world ranks 2 or 3 diverged ...")."""
    return bool(blame) and " or " not in blame.split(" diverged")[0]



def local_mpi_env(base=None):
    """An environment for running ranks under mpirun on this node: as root if need be,
    oversubscribing the cores, Open MPI talking over loopback only."""
    env = dict(os.environ if base is None else base)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_oob_tcp_if_include="lo",
               OMPI_MCA_btl_tcp_if_include="lo")
    return env


# --- the environment the ranks get ---------------------------------------------------------------

def read_env_file(paths):
    """`.zeal_env` lines: `NAME=VALUE` sets a variable for every rank, a bare `NAME` forwards this
    process's value. The first file found wins (working directory, then home)."""
    for path in paths:
        if not os.path.isfile(path):
            continue
        out = {}
        with open(path) as f:
            for number, raw in enumerate(f, start=1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                name, eq, value = line.partition("=")
                name = name.strip()
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise SystemExit(f"zeal: {path}:{number}: expected NAME or NAME=VALUE, got {raw.strip()!r}")
                if eq:
                    out[name] = value.strip()
                elif name in os.environ:
                    out[name] = os.environ[name]
        return out
    return {}


def rank_environment(args, plan):
    """The variables every rank gets, on every host (besides its own numbers)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}
    env.update(read_env_file([os.path.join(os.getcwd(), ".zeal_env"), os.path.expanduser("~/.zeal_env")]))
    env["MASTER_ADDR"] = args.master_addr
    env["MASTER_PORT"] = str(args.master_port)
    env["PYTHONUNBUFFERED"] = "1"
    env["ZEAL_PASS_LOCAL_RANK"] = "0" if args.no_local_rank else "1"
    # Slots picked by --include become CUDA_VISIBLE_DEVICES (zeal/_rank.py). The ssh and pdsh agents
    # get each node's own list; the one-command backends can carry one list shared by all nodes.
    slot_lists = {tuple(n.slots) for n in plan.nodes}
    if args.launcher in ("local", "openmpi", "slurm") and len(slot_lists) == 1:
        slots = next(iter(slot_lists))
        if list(slots) != list(range(len(slots))):
            env["ZEAL_NODE_SLOTS"] = ",".join(map(str, slots))
    if args.log_dir:
        env["ZEAL_LOG_DIR"] = os.path.abspath(args.log_dir)
    else:
        env.pop("ZEAL_LOG_DIR", None)
    return env


# --- commands, one builder per launcher ----------------------------------------------------------

def _mpirun(args, plan, env, local):
    mpirun = shutil.which("mpirun") or "mpirun"
    cmd = [mpirun, "-np", str(plan.world_size), "--bind-to", "none"]
    if local:
        # One node: the ranks and mpirun talk over loopback only.
        cmd += ["--oversubscribe", "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_tcp_if_include", "lo"]
    else:
        cmd += ["-H", ",".join(f"{n.host}:{n.size}" for n in plan.nodes)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += shlex.split(args.launcher_args)
    for name in sorted(env):
        if not name.startswith("OMPI_"):  # mpirun passes its own OMPI_* settings on
            cmd += ["-x", name]
    return cmd + [sys.executable, "-u", "-m", "zeal._rank", args.script, *args.script_args]


def _agent_command(args, plan, env, node_rank):
    """The shell command a remote host runs: the node agent, from this working directory."""
    sizes = ",".join(str(n.size) for n in plan.nodes)
    slots = ",".join(str(s) for s in plan.nodes[node_rank].slots) if isinstance(node_rank, int) else ""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    agent = [sys.executable, "-u", "-m", "zeal._node", "--node_rank", str(node_rank), "--node_sizes", sizes]
    if slots:
        agent += ["--node_slots", slots]
    if args.launcher == "ssh":
        agent.append("--watch_stdin")
    agent += [args.script, *args.script_args]
    return f"cd {shlex.quote(os.getcwd())} && env {exports} {shlex.join(agent)}"


def build_commands(args, plan, env):
    """[(label, argv)]: the processes the launcher starts; the label names the host(s)."""
    if args.launcher in ("local", "openmpi"):
        return [(",".join(n.host for n in plan.nodes), _mpirun(args, plan, env, args.launcher == "local"))]
    if args.launcher == "ssh":
        return [(n.host, ["ssh", "-o", "BatchMode=yes", *shlex.split(args.launcher_args), n.host,
                          _agent_command(args, plan, env, i)])
                for i, n in enumerate(plan.nodes)]
    if args.launcher == "pdsh":
        # pdsh replaces %n with the host's index in the -w list: the node rank.
        return [(",".join(n.host for n in plan.nodes),
                 ["pdsh", "-S", "-f", "1024", *shlex.split(args.launcher_args), "-w", ",".join(n.host for n in plan.nodes),
                  _agent_command(args, plan, env, "%n")])]
    # slurm: srun starts the ranks; they take their numbers from SLURM_* (zeal/_rank.py).
    sizes = {n.size for n in plan.nodes}
    cmd = ["srun", "--nodes", str(len(plan.nodes)), "--ntasks", str(plan.world_size)]
    if len(sizes) == 1:
        cmd += ["--ntasks-per-node", str(sizes.pop())]
    cmd += ["--nodelist", ",".join(n.host for n in plan.nodes), "--kill-on-bad-exit=1",
            "--export", ",".join(["ALL", *sorted(env)]), *shlex.split(args.launcher_args),
            sys.executable, "-u", "-m", "zeal._rank", args.script, *args.script_args]
    return [(",".join(n.host for n in plan.nodes), cmd)]


# --- running and watching ------------------------------------------------------------------------

def process_tree(root):
    """root and every process below it, from /proc: the ssh processes pdsh starts leave its
    process group and session (setsid), but stay its children while it lives."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def signal_all(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class Job:
    """The processes of one launch, watched until all succeed or the first failure stops them all."""

    def __init__(self, commands, env, plan, stdin_pipe):
        self.plan = plan
        self.lock = threading.Lock()
        self.markers = []     # (rank, code) from rank failure lines
        self.mpi_named = []   # ranks mpirun named in its own failure report
        self.procs, self.labels, self.pumps = [], [], []
        for label, cmd in commands:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                    env=env, text=True, bufsize=1, start_new_session=True)
            self.procs.append(proc)
            self.labels.append(label)
            for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self.pumps.append(t)

    def _pump(self, src, dst):
        # mpirun's own reports come as blocks between lines of dashes. Once a rank has failed they
        # repeat what Zeal's last line says in a crash's words ("Primary job terminated normally,
        # but ...", "exited on signal 15"): those are read for the rank they name and dropped, so
        # Zeal's message stays the last and only one. Blocks before any failure pass through.
        block = None
        for line in src:
            marker = _MARKER.search(line)
            if marker:
                with self.lock:
                    self.markers.append((int(marker.group(1)), int(marker.group(2)), marker.group(3)))
                continue
            own = line.startswith("[rank")
            if not own:
                named = _MPI_RANK.search(line)
                if named:
                    with self.lock:
                        self.mpi_named.append(int(named.group(1) or named.group(2)))
            if not own and _MPI_RULE.match(line):
                if block is None:
                    block = [line]
                    continue
                block.append(line)
                line, block = "".join(block), None
                if self.failing():
                    continue
            elif block is not None:
                block.append(line)
                continue
            elif not own and self.failing() and _MPI_AFTERMATH.search(line):
                continue
            dst.write(line)
            dst.flush()
        if block and not self.failing():
            dst.write("".join(block))
            dst.flush()

    def failing(self):
        with self.lock:
            return bool(self.markers) or any(p.poll() not in (None, 0) for p in self.procs)

    def host_of(self, rank):
        for n in self.plan.nodes:
            if n.rank_base <= rank < n.rank_base + n.size:
                return n.host
        return "?"

    def stop(self):
        """Stop every process and wait until each is gone. An ssh node agent is asked first, by
        closing its stdin: it stops its ranks and exits, and only then does ssh end, so nothing
        is left running on the remote host when this returns. What does not end within the grace
        period gets SIGTERM, then SIGKILL, to its whole process tree."""
        live = [p for p in self.procs if p.poll() is None]
        asked = [p for p in live if p.stdin]
        for p in asked:
            try:
                p.stdin.close()
            except OSError:
                pass
        self._wait(asked, STOP_GRACE_S)
        trees = {p.pid: process_tree(p.pid) for p in live if p.poll() is None}
        for pids in trees.values():
            signal_all(pids, signal.SIGTERM)
        self._wait(live, STOP_GRACE_S)
        for pids in trees.values():
            signal_all(pids, signal.SIGKILL)  # also what the root left behind (pdsh's ssh)
        for p in live:
            p.wait()

    @staticmethod
    def _wait(procs, seconds):
        deadline = time.monotonic() + seconds
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)

    def run(self, interrupted):
        """0 when every process succeeded; else stops the rest and returns the failure's code."""
        while True:
            if interrupted.is_set():
                self.stop()
                signum = getattr(interrupted, "signum", signal.SIGINT)
                print(f"zeal: {signal.Signals(signum).name} received; every rank was stopped", file=sys.stderr,
                      flush=True)
                return 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
            with self.lock:
                failure = self.markers[0] if self.markers else None
            if failure:
                # The other ranks' reports of the same fault: one may name its culprit, where the
                # first to arrive could only say "ranks 2 or 3" (it compared with the culprit alone).
                deadline = time.monotonic() + 1.0
                time.sleep(0.3)
                while time.monotonic() < deadline:
                    with self.lock:
                        if any(_definite(m[2]) for m in self.markers):
                            break
                    time.sleep(0.05)
                break
            codes = [p.poll() for p in self.procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                time.sleep(0.3)  # let a marker printed just before the exit arrive
                with self.lock:
                    failure = self.markers[0] if self.markers else ("process", bad[0])
                break
            if all(c == 0 for c in codes):
                for t in self.pumps:
                    t.join(timeout=5)
                return 0
            time.sleep(0.05)
        self.stop()
        for t in self.pumps:
            t.join(timeout=5)
        if failure[0] == "process":
            index, code = failure[1]
            with self.lock:
                named = self.mpi_named[0] if self.mpi_named else None
            if named is not None:
                who = f"rank {named} on {self.host_of(named)}"
            else:
                who = f"the launch on {self.labels[index]}"
            print(f"zeal: {who} failed (exit code {code}); every rank was stopped", file=sys.stderr, flush=True)
            return code if code > 0 else 1
        with self.lock:
            blames = [m for m in self.markers if m[2]]
            blamed = next((m for m in blames if _definite(m[2])), blames[0] if blames else None)
        if blamed:
            # A collective's error names whose fault it was: say that, not which rank noticed first.
            rank, code, blame = blamed
            who = re.match(r"world ranks? ([\d, ]+?)(?: or |\s[a-z])", blame)
            first = int(who.group(1).split(",")[0]) if who else rank
            print(f"zeal: {blame} (rank {first} on {self.host_of(first)}; reported by rank {rank}, exit code {code}); "
                  "every rank was stopped", file=sys.stderr, flush=True)
            return code or 1
        rank, code, _ = failure
        print(f"zeal: rank {rank} on {self.host_of(rank)} failed with exit code {code}; every rank was stopped",
              file=sys.stderr, flush=True)
        return code or 1


def parse_args(argv):
    p = argparse.ArgumentParser(prog="zeal", description="Start a Zeal training script on the ranks of one or more "
                                "hosts (options as the deepspeed launcher's; see docs/launcher.md).")
    p.add_argument("-H", "--hostfile", default=None, help=f"lines 'HOST slots=N' (default {DEFAULT_HOSTFILE} "
                   "if it exists, else this host alone)")
    p.add_argument("-i", "--include", default="", help="only these hosts / slots: 'host1:0,1@host2'")
    p.add_argument("-e", "--exclude", default="", help="not these hosts / slots: 'host1:0@host2'")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts")
    p.add_argument("--num_procs", "--num_gpus", type=int, default=-1, help="ranks per host")
    p.add_argument("--master_addr", default="", help="rendezvous address (default: the first host)")
    p.add_argument("--master_port", type=int, default=29500)
    p.add_argument("--launcher", default="", choices=("",) + LAUNCHERS,
                   help="local (one host), openmpi, ssh, pdsh, slurm (default: local for this host alone, else ssh)")
    p.add_argument("--launcher_args", default="", help="extra arguments for mpirun / ssh / pdsh / srun")
    p.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=K to the script")
    p.add_argument("--log_dir", default="", help="write each rank's output to LOG_DIR/rankK.log")
    p.add_argument("--dry_run", action="store_true", help="print the commands, start nothing")
    p.add_argument("script", help="the Python training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p, p.parse_args(argv)


def make_plan(parser, args):
    hostfile = args.hostfile or (DEFAULT_HOSTFILE if os.path.isfile(DEFAULT_HOSTFILE) else None)
    try:
        if hostfile is None:
            if args.include or args.exclude or args.num_nodes > 1:
                parser.error("--include, --exclude and --num_nodes need a hostfile (--hostfile)")
            return hostlib.local_plan(args.num_procs if args.num_procs > 0 else 1)
        return hostlib.make_plan(hostlib.read_hostfile(hostfile), args.include, args.exclude, args.num_nodes,
                                 args.num_procs)
    except hostlib.HostfileError as e:
        raise SystemExit(f"zeal: {e}") from None


def main(argv=None):
    parser, args = parse_args(argv)
    if args.num_procs == 0 or args.num_procs < -1:
        parser.error(f"--num_procs must be >= 1, got {args.num_procs}")
    plan = make_plan(parser, args)
    local = hostlib.is_local_only(plan)
    if not args.launcher:
        args.launcher = "local" if local else "ssh"
    if args.launcher == "local" and not local:
        parser.error(f"--launcher local runs on this host only; the plan names {', '.join(n.host for n in plan.nodes)}")
    if not args.master_addr:
        args.master_addr = "127.0.0.1" if local else plan.nodes[0].host
    env = rank_environment(args, plan)
    commands = build_commands(args, plan, env)
    if args.dry_run:
        for _, cmd in commands:
            print(shlex.join(cmd))
        return 0
    if not os.path.isfile(args.script):
        print(f"zeal: the training script {args.script!r} does not exist", file=sys.stderr)
        return 2
    for _, cmd in commands:
        if shutil.which(cmd[0]) is None:
            print(f"zeal: --launcher {args.launcher} needs '{cmd[0]}', which is not on the PATH", file=sys.stderr)
            return 2
    run_env = dict(os.environ, **env)
    if args.launcher == "local":
        run_env = local_mpi_env(run_env)
    if args.launcher == "pdsh":
        run_env.setdefault("PDSH_RCMD_TYPE", "ssh")  # pdsh's own default is rsh
    interrupted = threading.Event()

    def on_signal(signum, _frame):
        interrupted.signum = signum
        interrupted.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    job = Job(commands, run_env, plan, stdin_pipe=args.launcher == "ssh")
    return job.run(interrupted)


if __name__ == "__main__":
    sys.exit(main())
