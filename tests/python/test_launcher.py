"""The zeal launcher: host selection rules, the exact commands of every backend (--dry_run), rank
variables and environment forwarding, failures that must stop every rank, and real multi-host
training through ssh and Open MPI between two network namespaces with their own sshd."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from conftest import RANKS, ROOT, run_mpi

import zeal.hosts as hosts
from zeal.launcher import local_mpi_env

sys.path.insert(0, str(RANKS))
import common  # noqa: E402

PROBE = RANKS / "launcher_probe.py"


# --- host selection (pure) ------------------------------------------------------------------------

def test_hostfile_with_comments_and_blank_lines():
    text = "# cluster\nworker-0 slots=4\n\n  worker-1   slots=2  # the small one\n"
    assert hosts.parse_hostfile(text) == {"worker-0": 4, "worker-1": 2}


@pytest.mark.parametrize("text,where,what", [
    ("worker-0 slots=4\nworker-1 slots=two\n", "hf:2", "expected 'HOST slots=N'"),
    ("worker-0 4\n", "hf:1", "expected 'HOST slots=N'"),
    ("worker-0 slots=0\n", "hf:1", "slots must be >= 1"),
    ("a slots=1\na slots=2\n", "hf:2", "appears twice"),
    ("# nothing\n\n", "hf", "no hosts"),
])
def test_bad_hostfiles_name_file_and_line(text, where, what):
    with pytest.raises(hosts.HostfileError, match=what) as e:
        hosts.parse_hostfile(text, "hf")
    assert str(e.value).startswith(where + ":")


def test_include_exclude_num_nodes_num_procs():
    hf = {"a": 4, "b": 4, "c": 2}
    plan = hosts.make_plan(hf, include="a:0,2@c")
    assert [(n.host, n.slots, n.rank_base) for n in plan.nodes] == [("a", [0, 2], 0), ("c", [0, 1], 2)]
    plan = hosts.make_plan(hf, exclude="a@b:1,3")
    assert [(n.host, n.slots) for n in plan.nodes] == [("b", [0, 2]), ("c", [0, 1])]
    plan = hosts.make_plan(hf, num_nodes=2, num_procs=3)
    assert [(n.host, n.slots) for n in plan.nodes] == [("a", [0, 1, 2]), ("b", [0, 1, 2])]
    assert plan.world_size == 6 and plan.rank_of(1, 2) == 5


@pytest.mark.parametrize("kw,what", [
    ({"include": "a:0,5"}, r"selects slots \[5\] of 'a', but the hostfile gives it 4"),
    ({"include": "z"}, "does not list"),
    ({"include": "a", "exclude": "b"}, "cannot be used together"),
    ({"num_nodes": 4}, "only 3 hosts"),
    ({"num_procs": 3}, "'c' has 2 slots"),
    ({"exclude": "a@b@c"}, "no hosts left"),
    ({"include": "a:x"}, "must be integers"),
])
def test_bad_selections(kw, what):
    with pytest.raises(hosts.HostfileError, match=what):
        hosts.make_plan({"a": 4, "b": 4, "c": 2}, **kw)


# --- the commands each backend runs (--dry_run) ----------------------------------------------------

def dry_run(tmp_path, *args, env=None):
    hf = tmp_path / "hostfile"
    hf.write_text("node1 slots=2\nnode2 slots=2\n")
    proc = subprocess.run([shutil.which("zeal"), "--dry_run", "--hostfile", str(hf), *args, str(PROBE), "--x", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_dry_run_commands(tmp_path):
    py, cwd = sys.executable, str(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL", "PYTHON", "UCX", "OMPI", "ZEAL"))}
    env["ZEAL_TEST_VAR"] = "a b"  # forwarded by its prefix; a space survives the remote shell
    (tmp_path / ".zeal_env").write_text("# forwarded too\nMY_SETTING=42\n")
    exports = ["MASTER_ADDR=node1", "MASTER_PORT=29500", "MY_SETTING=42", "PYTHONUNBUFFERED=1",
               "ZEAL_PASS_LOCAL_RANK=1", "ZEAL_TEST_VAR=a b"]

    def agent(node_rank, *extra):
        return ["cd", cwd, "&&", "env", *exports, py, "-u", "-m", "zeal._node", "--node_rank", node_rank,
                "--node_sizes", "2,1", *extra, str(PROBE), "--x", "1"]

    ssh = [shlex.split(line) for line in dry_run(tmp_path, "--launcher", "ssh", "--include", "node1@node2:1",
                                                 "--launcher_args=-p 2222", env=env)]
    assert [argv[:-1] for argv in ssh] == [["ssh", "-o", "BatchMode=yes", "-p", "2222", "node1"],
                                           ["ssh", "-o", "BatchMode=yes", "-p", "2222", "node2"]]
    assert shlex.split(ssh[0][-1]) == agent("0", "--node_slots", "0,1", "--watch_stdin")
    assert shlex.split(ssh[1][-1]) == agent("1", "--node_slots", "1", "--watch_stdin")

    pdsh = [shlex.split(line) for line in dry_run(tmp_path, "--launcher", "pdsh", "--include", "node1@node2:1",
                                                  env=env)]
    assert len(pdsh) == 1 and pdsh[0][:-1] == ["pdsh", "-S", "-f", "1024", "-w", "node1,node2"]
    assert shlex.split(pdsh[0][-1]) == agent("%n")  # pdsh puts the host's index in the -w list for %n

    slurm = dry_run(tmp_path, "--launcher", "slurm", "--num_procs", "1", "--no_local_rank", env=env)
    assert [shlex.split(line) for line in slurm] == [[
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--nodelist", "node1,node2",
        "--kill-on-bad-exit=1", "--export",
        "ALL,MASTER_ADDR,MASTER_PORT,MY_SETTING,PYTHONUNBUFFERED,ZEAL_PASS_LOCAL_RANK,ZEAL_TEST_VAR",
        py, "-u", "-m", "zeal._rank", str(PROBE), "--x", "1"]]

    mpi = dry_run(tmp_path, "--launcher", "openmpi", "--master_addr", "10.0.0.1", "--log_dir", "logs", env=env)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    exported = ["MASTER_ADDR", "MASTER_PORT", "MY_SETTING", "PYTHONUNBUFFERED", "ZEAL_LOG_DIR", "ZEAL_PASS_LOCAL_RANK",
                "ZEAL_TEST_VAR"]
    assert [shlex.split(line) for line in mpi] == [[
        shutil.which("mpirun"), "-np", "4", "--bind-to", "none", "-H", "node1:2,node2:2", *root,
        *[w for name in exported for w in ("-x", name)], py, "-u", "-m", "zeal._rank", str(PROBE), "--x", "1"]]


# --- one host, real ranks ------------------------------------------------------------------------

def zeal_cmd(*args, timeout=120, env=None, cwd=None):
    start = time.monotonic()
    proc = subprocess.run([shutil.which("zeal"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or local_mpi_env(), cwd=cwd)
    return proc, time.monotonic() - start


def survivors(tag):
    """Processes whose command line carries tag: none may outlive the launcher."""
    out = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
    return [p for p in out if int(p) != os.getpid()]


def test_rank_variables_local_rank_argument_forwarding_and_log_dir(tmp_path):
    env = local_mpi_env()
    env["ZEAL_PROBE_FORWARDED"] = "yes"
    proc, _ = zeal_cmd("--num_procs", 2, PROBE, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if "PROBE" in line)
    for rank, line in enumerate(lines):
        assert line.startswith(f"[rank{rank}]: PROBE RANK={rank} WORLD_SIZE=2 LOCAL_RANK={rank} LOCAL_SIZE=2"), line
        assert "ZEAL_PROBE_FORWARDED=yes" in line and f"local_rank_arg={rank}" in line
    proc, _ = zeal_cmd("--num_procs", 2, "--no_local_rank", "--log_dir", tmp_path / "logs", PROBE)
    assert proc.returncode == 0 and "PROBE" not in proc.stdout
    for rank in range(2):
        text = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        assert f"PROBE RANK={rank}" in text and "local_rank_arg=-1" in text


def test_included_slots_become_each_ranks_device(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=4\n")
    env = local_mpi_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc, _ = zeal_cmd("--hostfile", hf, "--include", "localhost:1,3", PROBE, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if "PROBE" in line)
    assert len(lines) == 2
    assert "RANK=0 " in lines[0] and "CUDA_VISIBLE_DEVICES=1 " in lines[0]
    assert "RANK=1 " in lines[1] and "CUDA_VISIBLE_DEVICES=3 " in lines[1]


@pytest.mark.parametrize("how,code,message", [
    (("--fail_rank", 1), 3, "zeal: rank 1 on localhost failed with exit code 3"),
    (("--kill_rank", 2), 137, "zeal: rank 2 on localhost failed (exit code 137)"),
])
def test_a_failing_or_killed_rank_stops_every_rank(how, code, message):
    tag = f"zealtag{uuid.uuid4().hex[:8]}"
    proc, elapsed = zeal_cmd("--num_procs", 3, PROBE, *how, "--tag", tag)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert elapsed < 30, f"the other ranks were not stopped promptly ({elapsed:.0f}s)"
    assert survivors(tag) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_every_rank(sig, code):
    tag = f"zealtag{uuid.uuid4().hex[:8]}"
    launcher = subprocess.Popen([shutil.which("zeal"), "--num_procs", "2", str(PROBE), "--sleep", "60", "--tag", tag],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=local_mpi_env())
    deadline = time.monotonic() + 60
    while len(survivors(tag)) < 4 and time.monotonic() < deadline:  # launcher, mpirun and both ranks are up
        time.sleep(0.2)
    launcher.send_signal(sig)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == code and f"{sig.name} received; every rank was stopped" in err, err
    assert survivors(tag) == []


def test_user_errors_end_promptly_with_a_message(tmp_path):
    proc, elapsed = zeal_cmd("--num_procs", 2, tmp_path / "no_such_script.py")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and elapsed < 20
    empty = tmp_path / "empty"
    empty.write_text("# no hosts\n")
    proc, _ = zeal_cmd("--hostfile", empty, PROBE)
    assert proc.returncode == 1 and "no hosts" in proc.stderr
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\n")
    proc, _ = zeal_cmd("--hostfile", hf, "--include", "localhost:0,1,2,3", PROBE)
    assert proc.returncode == 1 and "selects slots [2, 3] of 'localhost', but the hostfile gives it 2" in proc.stderr


# --- two hosts: network namespaces with their own sshd --------------------------------------------

SUBNET = "10.213.7"
HOSTS = [f"{SUBNET}.11", f"{SUBNET}.12"]


def sh(*cmd, check=True):
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=check)


def teardown_hosts(d):
    for i in (1, 2):
        pid = d / f"sshd{i}.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", f"zealh{i}", check=False)
    sh("ip", "link", "del", "zealbr0", check=False)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """Two hosts on one machine: network namespaces zealh1 and zealh2 on a bridge, each with an
    sshd that accepts a key made here. Yields (hostfile, ssh options)."""
    if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("no sshd (openssh-server); scripts/install-deps installs it")
    d = tmp_path_factory.mktemp("hosts")
    teardown_hosts(d)
    if sh("ip", "netns", "add", "zealh1", check=False).returncode != 0:
        pytest.skip("network namespaces cannot be created here (ip netns add failed: needs CAP_SYS_ADMIN)")
    try:
        os.makedirs("/run/sshd", exist_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "client_key")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key")
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        sh("ip", "link", "add", "zealbr0", "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", "zealbr0")
        sh("ip", "link", "set", "zealbr0", "up")
        for i, addr in enumerate(HOSTS, start=1):
            ns = f"zealh{i}"
            if i > 1:
                sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"zealv{i}", "type", "veth", "peer", "name", f"zealp{i}")
            sh("ip", "link", "set", f"zealv{i}", "master", "zealbr0")
            sh("ip", "link", "set", f"zealv{i}", "up")
            sh("ip", "link", "set", f"zealp{i}", "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", f"zealp{i}")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"zealp{i}", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "/usr/sbin/sshd", "-o", f"ListenAddress={addr}", "-o", f"HostKey={d}/host_key",
               "-o", f"AuthorizedKeysFile={d}/authorized_keys", "-o", "PermitRootLogin=yes", "-o", "StrictModes=no",
               "-o", f"PidFile={d}/sshd{i}.pid", "-o", "UsePAM=no", "-o", "PasswordAuthentication=no")
        ssh_opts = (f"-i {d}/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                    "-o LogLevel=ERROR -o ConnectTimeout=5")
        hostfile = d / "hostfile"
        hostfile.write_text("".join(f"{h} slots=2\n" for h in HOSTS))
        yield hostfile, ssh_opts
    finally:
        teardown_hosts(d)


def multi_host_env(ssh_opts):
    # No loopback-only Open MPI settings here: the ranks talk across the bridge. pdsh takes its
    # ssh options from the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_MCA")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PDSH_SSH_ARGS_APPEND=ssh_opts)
    return env


def launcher_args(launcher, ssh_opts):
    if launcher == "ssh":
        return f"--launcher_args={ssh_opts}"
    if launcher == "pdsh":
        return "--launcher_args=-u 60"  # pdsh's command timeout
    # Open MPI starts its daemons through ssh with the same key. The two "hosts" share /dev/shm and
    # the hostname, so shared-memory transport between them would collide: TCP only.
    return (f"--launcher_args=--mca plm_rsh_args '{ssh_opts}' --mca btl self,tcp "
            f"--mca btl_tcp_if_include {SUBNET}.0/24 --mca oob_tcp_if_include {SUBNET}.0/24")


@pytest.mark.parametrize("launcher", ["ssh", "openmpi", "pdsh"])
def test_two_hosts_two_ranks_each_train_like_one_host(two_hosts, tmp_path, launcher):
    hostfile, ssh_opts = two_hosts
    if shutil.which(launcher if launcher != "openmpi" else "mpirun") is None:
        pytest.skip(f"{launcher} is not installed (scripts/install-deps installs it)")
    out = tmp_path / "params.pt"
    args = ["--steps", 10, "--micro", 2, "--gas", 2, "--clip", 1.0, "--stage", 2, "--bucket", 100]
    proc, _ = zeal_cmd("--hostfile", hostfile, "--launcher", launcher, launcher_args(launcher, ssh_opts),
                       "--master_port", 29731, RANKS / "dp_train.py", *args, "--out", out, timeout=240,
                       env=multi_host_env(ssh_opts), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    assert got["world"] == 4
    single = tmp_path / "single.pt"
    run_mpi(4, "dp_train.py", *args, "--out", single)
    want = torch.load(single)["params"]
    diff = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got["params"], want))
    assert diff <= 1e-5, f"2 hosts x 2 ranks vs 1 host x 4 ranks: max relative difference {diff:.3e}"


def gone_within(tag, seconds=5.0):
    """No process carries tag within `seconds` (a remote node agent notices its connection closed
    and stops its ranks; with pdsh that takes a moment after the launcher returns)."""
    deadline = time.monotonic() + seconds
    while survivors(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return survivors(tag) == []


@pytest.mark.parametrize("launcher", ["ssh", "pdsh"])
def test_two_hosts_a_failing_rank_stops_every_host(two_hosts, launcher):
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} is not installed (scripts/install-deps installs it)")
    hostfile, ssh_opts = two_hosts
    tag = f"zealtag{uuid.uuid4().hex[:8]}"
    proc, elapsed = zeal_cmd("--hostfile", hostfile, "--launcher", launcher, launcher_args(launcher, ssh_opts), PROBE,
                             "--fail_rank", 3, "--tag", tag, env=multi_host_env(ssh_opts), cwd=ROOT)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"zeal: rank 3 on {HOSTS[1]} failed with exit code 3" in proc.stderr
    assert elapsed < 30 and gone_within(tag)


def test_unreachable_host_ends_the_job(two_hosts, tmp_path):
    _, ssh_opts = two_hosts
    bad = tmp_path / "hostfile"
    bad.write_text(f"{HOSTS[0]} slots=1\n{SUBNET}.99 slots=1\n")
    tag = f"zealtag{uuid.uuid4().hex[:8]}"
    proc, elapsed = zeal_cmd("--hostfile", bad, "--launcher", "ssh", launcher_args("ssh", ssh_opts), PROBE,
                             "--sleep", 60, "--tag", tag, env=multi_host_env(ssh_opts), cwd=ROOT)
    assert proc.returncode == 255, proc.stdout + proc.stderr
    assert f"zeal: the launch on {SUBNET}.99 failed (exit code 255)" in proc.stderr
    assert elapsed < 30 and gone_within(tag)
