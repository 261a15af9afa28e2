"""ZeRO-Infinity's NVMe offload of the optimizer: exactness, swap-file hygiene and the faults disks have.

Exactness: with the master weights and Adam's moments in swap files, stepped a sub-group at a time,
the same arithmetic runs on the same values as without offload, so the runs must agree bitwise
(and so with torch, as test_equivalence shows for the run without offload). A sub-group swapped in
from the wrong file, at the wrong offset or before its write finished would not.

Faults run in one process (world size 1, stage 1) against real files: a missing, non-directory,
read-only or full nvme_path, a swap file rewritten or truncated underneath the run, and a swap
directory left by a process that died.
"""
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import zeal
from conftest import RANKS, run_mpi

sys.path.insert(0, str(RANKS))
import common  # noqa: E402


def max_rel_diff(got, want):
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


@pytest.mark.parametrize("stage,precision,pipeline", [(1, "fp32", False), (2, "fp32", True), (3, "fp32", True),
                                                      (1, "bf16", True), (2, "bf16", False), (3, "bf16", False)])
def test_nvme_offload_of_the_optimizer_equals_the_run_without(tmp_path, stage, precision, pipeline):
    swap = tmp_path / "swap"
    swap.mkdir()
    got, want = tmp_path / "nvme.pt", tmp_path / "plain.pt"
    args = ["--steps", 12, "--micro", 2, "--gas", 2, "--clip", 1.0, "--bucket", 100, "--stage", stage,
            "--precision", precision]
    # 3219 parameters, about 1610 per rank: sub-groups of 500 make four swap files per rank, the
    # last one short; two I/O threads with 8 KiB blocks cut each file into several requests.
    extra = ["--pipeline"] if pipeline else []
    run_mpi(2, "dp_train.py", *args, "--offload", "nvme", "--nvme_path", swap, "--sub_group", 500,
            "--aio_threads", 2, *extra, "--out", got)
    run_mpi(2, "dp_train.py", *args, "--out", want)
    got, want = torch.load(got), torch.load(want)
    assert got["master_device"] == "nvme"
    for a, b in zip(got["params"], want["params"]):
        assert torch.equal(a, b)
    if precision == "fp32":
        ref = common.reference_run(12, 2 * 2 * 2, lr=1e-2, weight_decay=0.01, clip=1.0)
        assert max_rel_diff(got["params"], ref) <= 1e-5
    assert list(swap.iterdir()) == [], "the ranks exited normally: their swap files must be gone"


@pytest.mark.parametrize("precision,optimizer_device,zero_init", [("fp32", "nvme", False), ("bf16", "nvme", True),
                                                                  ("fp32", None, False), ("bf16", "cpu", False)])
def test_nvme_offload_of_parameters_equals_the_run_without(tmp_path, precision, optimizer_device, zero_init):
    # offload_param {device: nvme} at stage 3: every rank's chunks live in a swap file and are read
    # at each gather; the optimizer's step writes them back (whole chunks, and read-patch-write for
    # the chunks that straddle a sub-group's ends: sub-groups of 500 elements cut several of them).
    swap = tmp_path / "swap"
    swap.mkdir()
    got, want = tmp_path / "nvme.pt", tmp_path / "plain.pt"
    args = ["--steps", 10, "--micro", 2, "--gas", 2, "--clip", 1.0, "--stage", 3, "--precision", precision]
    extra = ["--offload", optimizer_device, "--sub_group", 500] if optimizer_device else []
    extra += ["--zero_init"] if zero_init else []
    run_mpi(2, "dp_train.py", *args, "--offload_param", "nvme", "--nvme_path", swap, *extra, "--out", got)
    run_mpi(2, "dp_train.py", *args, "--out", want)
    got, want = torch.load(got), torch.load(want)
    for a, b in zip(got["params"], want["params"]):
        assert torch.equal(a, b)
    assert list(swap.iterdir()) == []


def test_cpu_offload_of_parameters_equals_the_run_without(tmp_path):
    # offload_param {device: cpu}: on this machine the shard is in host memory either way, so this
    # checks the config path and that nothing else changes.
    got, want = tmp_path / "cpu.pt", tmp_path / "plain.pt"
    args = ["--steps", 6, "--micro", 2, "--gas", 1, "--stage", 3]
    run_mpi(2, "dp_train.py", *args, "--offload_param", "cpu", "--offload", "cpu", "--out", got)
    run_mpi(2, "dp_train.py", *args, "--out", want)
    for a, b in zip(torch.load(got)["params"], torch.load(want)["params"]):
        assert torch.equal(a, b)


def _config(swap, **offload):
    return {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": 1, "sub_group_size": 300,
                                  "offload_optimizer": {"device": "nvme", "nvme_path": str(swap), **offload}},
            "aio": {"block_size": 4096, "queue_depth": 2}}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))  # 578 parameters


def _train(engine, steps):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 6), torch.randn(4, 2)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_nvme_run_swaps_and_trains_in_one_process(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    model = _model()
    engine, *_ = zeal.initialize(model=model, config=_config(swap))
    [store] = list(swap.iterdir())
    files = sorted(p.name for p in store.iterdir())
    assert files == ["optimizer_0.swp", "optimizer_1.swp"]  # 578 elements in sub-groups of 300
    # master + exp_avg + exp_avg_sq of 300 fp32 elements, padded to 4 KiB each
    assert (store / "optimizer_0.swp").stat().st_size == 3 * 4096
    before = _snapshot(model)
    _train(engine, 3)
    assert all(not torch.equal(a, b) for a, b in zip(before, _snapshot(model)))
    state = dict(engine._core.state_bytes)
    assert state["master"] == 0 and state["optimizer"] == 3 * 4096  # one buffer set of one sub-group
    del engine, _
    import gc

    gc.collect()
    assert list(swap.iterdir()) == []  # the engine's end removes its swap files


def test_missing_or_wrong_nvme_path_is_a_clear_error(tmp_path):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(zeal.IoError) as info:
        zeal.initialize(model=model, config=_config(tmp_path / "no-such-dir"))
    assert "no-such-dir" in str(info.value) and "No such file or directory" in str(info.value)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(zeal.IoError, match="a-file' for optimizer state swap is not a directory"):
        zeal.initialize(model=model, config=_config(a_file))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))


def _corrupt_and_step(tmp_path, damage):
    swap = tmp_path / "swap"
    swap.mkdir()
    model = _model()
    engine, *_ = zeal.initialize(model=model, config=_config(swap))
    _train(engine, 2)
    before = _snapshot(model)
    [store] = list(swap.iterdir())
    target = store / "optimizer_0.swp"
    damage(target)
    with pytest.raises(zeal.IoError) as info:
        _train(engine, 1)
    # Sub-group 0 is read first and checked before the optimizer sees it: no parameter moved.
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))
    assert str(target) in str(info.value)
    return str(info.value)


def test_swap_file_changed_underneath_is_caught_before_use(tmp_path):
    def rewrite(path):
        with open(path, "r+b") as f:
            f.seek(4096 + 40)  # inside exp_avg
            f.write(b"\x00\x01\x02\x03")
            f.flush()
            os.fsync(f.fileno())

    message = _corrupt_and_step(tmp_path, rewrite)
    assert "checksum mismatch" in message and "changed underneath" in message


def test_truncated_swap_file_is_a_short_read(tmp_path):
    def truncate(path):
        os.truncate(path, 4096)

    message = _corrupt_and_step(tmp_path, truncate)
    assert "short read of" in message and "bytes read" in message


def test_parameter_swap_file_changed_underneath_is_caught_at_the_gather(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "offload_param": {"device": "nvme", "nvme_path": str(swap)}},
              "aio": {"block_size": 4096}}
    engine, *_ = zeal.initialize(model=_model(), config=config)
    _train(engine, 1)
    [params] = [d / "params.swp" for d in swap.iterdir() if (d / "params.swp").exists()]
    with open(params, "r+b") as f:
        f.write(b"\x7f\x7f\x7f\x7f")  # chunk 0: the first layer's weight
    with pytest.raises(zeal.IoError) as info:
        _train(engine, 1)
    assert str(params) in str(info.value) and "changed underneath" in str(info.value)


def test_stale_swap_directory_of_a_dead_process_is_removed(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname().replace("/", "_").replace("-", "_")
    stale = swap / f"zeal-swap-{host}-{dead.pid}-0"
    stale.mkdir()
    (stale / "optimizer_0.swp").write_bytes(b"\x00" * 4096)
    other = swap / "not-zeal"  # anything else under nvme_path is left alone
    other.mkdir()
    engine, *_ = zeal.initialize(model=_model(), config=_config(swap))
    names = sorted(p.name for p in swap.iterdir())
    assert stale.name not in names and "not-zeal" in names
    assert any(n.startswith(f"zeal-swap-{host}-{os.getpid()}-") for n in names)


_MOUNT_SCRIPT = textwrap.dedent("""
    import sys, torch, zeal
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
              "zero_optimization": {"stage": 1, "sub_group_size": 300,
                                    "offload_optimizer": {"device": "nvme", "nvme_path": sys.argv[1]}}}
    try:
        zeal.initialize(model=model, config=config)
    except zeal.IoError as e:
        print("IOERROR:", e)
        sys.exit(3)
    print("STARTED")
""")


def _run_on_mount(tmp_path, mount_options):
    # A private mount namespace (unshare -m), so the test's tmpfs is nobody else's.
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(_MOUNT_SCRIPT)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    cmd = f"mount -t tmpfs -o {mount_options} zealtest {mnt} && exec {sys.executable} {script} {mnt}"
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)


def test_full_disk_is_refused_before_training(tmp_path):
    proc = _run_on_mount(tmp_path, "size=16k")  # 578 elements need 2 files x 3 x 4 KiB = 24 KiB
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "IOERROR:" in proc.stdout and "swap files need 24.0 KiB" in proc.stdout and "free" in proc.stdout


def test_read_only_nvme_path_is_refused(tmp_path):
    proc = _run_on_mount(tmp_path, "ro,size=1m")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "cannot create the optimizer state swap directory" in proc.stdout
    assert "Read-only file system" in proc.stdout
