"""Which ranks run where: the hostfile, --include / --exclude, --num_nodes and --num_procs turned
into a launch plan. Pure functions of their inputs (no processes, no network), so every rule is
unit-tested on its own (tests/python/test_launcher.py).

Formats follow DeepSpeed's launcher, so existing job scripts keep working:

  hostfile     one host a line, `worker-1 slots=4`; `#` starts a comment; blank lines are skipped
  --include    `worker-0:0,2@worker-1`: only these hosts, and on worker-0 only slots 0 and 2
  --exclude    the same syntax: drop these hosts, or only these slots of them
"""
from dataclasses import dataclass, field
import re

_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)$")


class HostfileError(ValueError):
    """A hostfile or host selection that cannot be used; the message says where and why."""


@dataclass
class Node:
    host: str
    slots: list  # the slot (device) indices this node's ranks use, in local-rank order
    rank_base: int = 0  # global rank of this node's local rank 0

    @property
    def size(self):
        return len(self.slots)


@dataclass
class Plan:
    nodes: list = field(default_factory=list)

    @property
    def world_size(self):
        return sum(n.size for n in self.nodes)

    def rank_of(self, node_index, local_rank):
        return self.nodes[node_index].rank_base + local_rank


def parse_hostfile(text, path="hostfile"):
    """Host -> slot count, in file order. Errors name the file and the line."""
    hosts = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise HostfileError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise HostfileError(f"{path}:{number}: slots must be >= 1, got {slots}")
        if host in hosts:
            raise HostfileError(f"{path}:{number}: host {host!r} appears twice")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{path}: no hosts (the file is empty or only comments)")
    return hosts


def read_hostfile(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror}") from None
    return parse_hostfile(text, path)


def parse_selection(spec, option):
    """`host:0,1@host2` -> {host: [0, 1], host2: None} (None: every slot)."""
    out = {}
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise HostfileError(f"{option} {spec!r}: empty host entry")
        host, _, slots = part.partition(":")
        if host in out:
            raise HostfileError(f"{option} {spec!r}: host {host!r} appears twice")
        if slots:
            try:
                out[host] = [int(s) for s in slots.split(",")]
            except ValueError:
                raise HostfileError(f"{option} {spec!r}: slots of {host!r} must be integers, got {slots!r}") from None
        else:
            out[host] = None
    return out


def make_plan(hosts, include="", exclude="", num_nodes=-1, num_procs=-1):
    """hosts: host -> slot count (the hostfile). Applies DeepSpeed's rules in DeepSpeed's order:
    include or exclude (not both), then the first num_nodes hosts, then the first num_procs slots
    of each. Ranks are numbered node by node."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    resources = {h: list(range(n)) for h, n in hosts.items()}
    if include:
        chosen = {}
        for host, slots in parse_selection(include, "--include").items():
            if host not in resources:
                raise HostfileError(f"--include names host {host!r}, which the hostfile does not list "
                                    f"(hosts: {', '.join(resources)})")
            if slots is not None:
                missing = [s for s in slots if s not in resources[host]]
                if missing:
                    raise HostfileError(f"--include selects slots {missing} of {host!r}, but the hostfile gives it "
                                        f"{len(resources[host])} (slots 0-{len(resources[host]) - 1})")
            chosen[host] = resources[host] if slots is None else sorted(set(slots))
        resources = {h: chosen[h] for h in resources if h in chosen}
    elif exclude:
        for host, slots in parse_selection(exclude, "--exclude").items():
            if host not in resources:
                raise HostfileError(f"--exclude names host {host!r}, which the hostfile does not list")
            if slots is None:
                del resources[host]
            else:
                resources[host] = [s for s in resources[host] if s not in slots]
                if not resources[host]:
                    del resources[host]
    if num_nodes > 0:
        if num_nodes > len(resources):
            raise HostfileError(f"--num_nodes {num_nodes}, but only {len(resources)} hosts are available")
        resources = dict(list(resources.items())[:num_nodes])
    if num_procs > 0:
        for host, slots in resources.items():
            if num_procs > len(slots):
                raise HostfileError(f"--num_procs {num_procs} per node, but {host!r} has {len(slots)} slots")
            resources[host] = slots[:num_procs]
    if not resources:
        raise HostfileError("no hosts left to run on after --include / --exclude")
    plan, base = Plan(), 0
    for host, slots in resources.items():
        plan.nodes.append(Node(host, slots, base))
        base += len(slots)
    return plan


def local_plan(num_procs):
    return Plan([Node("localhost", list(range(num_procs)), 0)])


LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_local_only(plan):
    import socket

    names = LOCAL_NAMES | {socket.gethostname()}
    return len(plan.nodes) == 1 and plan.nodes[0].host in names
