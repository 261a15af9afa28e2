"""Checkpoints: exact resume, resharding across world sizes and stages, crash safety, corruption
rejection, and zeal-to-fp32. Every run is real ranks under mpirun (ranks/ckpt_train.py)."""
import subprocess
import sys

import pytest
import torch

from conftest import RANKS, run_mpi

sys.path.insert(0, str(RANKS))
import common  # noqa: E402

import zeal  # noqa: E402


def train(world, tmp_path, name, **kw):
    out = tmp_path / f"{name}.pt"
    args = []
    for k, v in kw.items():
        if k == "save_at":
            args += ["--save_at", *v]
        elif k != "check":
            args += [f"--{k}", v]
    proc = run_mpi(world, "ckpt_train.py", *args, "--out", out, timeout=180, check=kw.get("check", True))
    return proc, (torch.load(out) if out.exists() else None)


def max_rel_diff(got, want):
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_bitwise_exact(tmp_path, stage):
    # N + M steps uninterrupted == N steps, save, load (same world size), M steps: bitwise in fp32,
    # LR schedule (warmup) and Adam moments included.
    ckpt = tmp_path / "ckpt"
    _, whole = train(2, tmp_path, "whole", stage=stage, until=10)
    train(2, tmp_path, "first", stage=stage, until=6, save_at=[6], save_dir=ckpt)
    _, resumed = train(2, tmp_path, "resumed", stage=stage, until=10, load=ckpt)
    assert resumed["steps"] == 10 and resumed["lr"] == whole["lr"]
    for name, want in whole["params"].items():
        assert torch.equal(resumed["params"][name], want), name


@pytest.mark.parametrize("saved,loaded", [((2, 1), (4, 3)), ((4, 3), (2, 2)), ((2, 2), (4, 1)), ((4, 0), (2, 3))])
def test_reshard_on_load_matches_torch(tmp_path, saved, loaded):
    # Saved at one (world size, stage), continued at another with no conversion step. The run must
    # still match the single-process torch reference over all 10 steps: the optimizer moments were
    # resharded correctly, or the last 4 steps would move the parameters elsewhere.
    ckpt = tmp_path / "ckpt"
    train(saved[0], tmp_path, "first", stage=saved[1], until=6, save_at=[6], save_dir=ckpt)
    _, resumed = train(loaded[0], tmp_path, "resumed", stage=loaded[1], until=10, load=ckpt)
    want = reference(10)
    diff = max_rel_diff(resumed["params"], want)
    assert diff <= 1e-5, f"max relative parameter difference {diff:.3e}"


def reference(steps):
    """Torch AdamW + clipping + DeepSpeed's WarmupLR (log warmup over 5 steps from 0; the first
    step runs at the scheduler's iteration -1, i.e. warmup_min_lr)."""
    import math

    model = common.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(steps):
        it = step - 1
        lr = 0.0 if it < 0 else 1e-2 * (math.log(it + 1) / math.log(5) if it < 5 else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = common.global_batch(step, 8)
        opt.zero_grad()
        common.loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("saved_offload,loaded_offload", [("cpu", "none"), ("none", "cpu"), ("nvme", "none"),
                                                          ("none", "nvme"), ("nvme", "cpu")])
def test_checkpoints_move_between_offload_and_no_offload(tmp_path, saved_offload, loaded_offload):
    # A checkpoint saved with the optimizer offloaded to host memory or to NVMe swap files resumes
    # without offload, and the reverse, bitwise like an uninterrupted run.
    ckpt = tmp_path / "ckpt"
    swap = tmp_path / "swap"
    swap.mkdir()
    _, whole = train(2, tmp_path, "whole", stage=2, until=10)
    train(2, tmp_path, "first", stage=2, until=6, save_at=[6], save_dir=ckpt, offload=saved_offload, nvme_path=swap)
    _, resumed = train(2, tmp_path, "resumed", stage=2, until=10, load=ckpt, offload=loaded_offload, nvme_path=swap)
    assert list(swap.iterdir()) == [], "swap files left behind"
    for name, want in whole["params"].items():
        assert torch.equal(resumed["params"][name], want), name


@pytest.mark.parametrize("kill", ["1:shard_half", "0:before_publish"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, kill):
    ckpt = tmp_path / "ckpt"
    proc, _ = train(2, tmp_path, "killed", stage=2, until=8, save_at=[4, 8], save_dir=ckpt, kill=kill, check=False)
    assert proc.returncode != 0
    assert (ckpt / "latest").read_text().strip() == "global_step4"
    assert not (ckpt / "global_step8").exists()
    # The previous checkpoint loads and continues exactly like an uninterrupted run.
    _, resumed = train(2, tmp_path, "resumed", stage=2, until=10, load=ckpt)
    _, whole = train(2, tmp_path, "whole", stage=2, until=10)
    for name, want in whole["params"].items():
        assert torch.equal(resumed["params"][name], want), name


def test_corrupted_truncated_and_mismatched_checkpoints_are_rejected(tmp_path):
    ckpt = tmp_path / "ckpt"
    train(2, tmp_path, "first", stage=1, until=2, save_at=[2], save_dir=ckpt)
    shard = ckpt / "global_step2" / "shard_r00001.safetensors"
    good = shard.read_bytes()

    def load_error():
        proc, _ = train(2, tmp_path, "load", stage=1, until=3, load=ckpt, check=False)
        assert proc.returncode != 0
        return proc.stdout + proc.stderr

    data = bytearray(good)
    data[-7] ^= 0xFF  # one flipped bit pattern in the optimizer state
    shard.write_bytes(bytes(data))
    assert "fails its CRC32 check" in load_error()
    shard.write_bytes(good[:-100])
    assert "truncated" in load_error()
    shard.write_bytes(good)
    # A model of another shape: named parameter, both shapes.
    manifest = ckpt / "global_step2" / "zeal_checkpoint.json"
    text = zeal._zeal.read_sealed_json(str(manifest))  # edits resealed: the checks behind the checksum
    zeal._zeal.write_sealed_json(str(manifest), text.replace('"format":"zeal-checkpoint"', '"format":"other"'))
    assert "format is not 'zeal-checkpoint'" in load_error()
    zeal._zeal.write_sealed_json(str(manifest), text.replace('"0.weight"', '"0.weights"'))
    assert "has no parameter '0.weight'" in load_error()


def test_zeal_to_fp32_equals_live_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    _, live = train(4, tmp_path, "first", stage=3, until=5, save_at=[5], save_dir=ckpt)
    out = tmp_path / "weights.safetensors"
    cli = subprocess.run(["zeal-to-fp32", str(ckpt), str(out)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    consolidated = zeal._zeal.read_safetensors(str(out))
    assert set(consolidated) == set(live["params"])
    for name, want in live["params"].items():
        assert consolidated[name].dtype == torch.float32 and torch.equal(consolidated[name], want), name
    in_memory = zeal.checkpoint.to_fp32_state_dict(str(ckpt))
    assert in_memory.keys() == consolidated.keys()
    assert all(torch.equal(in_memory[n], consolidated[n]) for n in consolidated)
    bad = subprocess.run(["zeal-to-fp32", str(tmp_path / "nothing"), str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "no 'latest' file" in bad.stderr


@pytest.mark.parametrize("save_at", [3, 6])
def test_onebit_adam_resumes_across_its_freeze_step(tmp_path, save_at):
    # freeze_step 4. Saved before the freeze (step 3), the resumed run freezes at step 4 by itself
    # and is bitwise the uninterrupted run (the compression's error buffers are zero either way).
    # Saved after it (step 6), the resumed run is compressed from its first step (momentum, frozen
    # variance and step count restored) and restarts the error buffers at zero, as DeepSpeed does:
    # it is deterministic (two resumes agree bitwise) but not the uninterrupted run. How far it
    # lands from that run says little here: with the variance frozen after 4 steps, an element
    # whose variance is still tiny takes a huge step from a sign bit, in either run.
    ckpt = tmp_path / "ckpt"
    _, whole = train(2, tmp_path, "whole", stage=0, until=10, onebit_freeze=4)
    train(2, tmp_path, "first", stage=0, until=save_at, save_at=[save_at], save_dir=ckpt, onebit_freeze=4)
    _, resumed = train(2, tmp_path, "resumed", stage=0, until=10, load=ckpt, onebit_freeze=4)
    comms = resumed["comms"]
    # Past the freeze only the compressed all-reduce carries the optimizer's traffic: one
    # all_to_all per compressed step, and no gradient all_reduce (what remains is the load's
    # 4-byte agreement flag).
    assert comms["all_to_all"]["calls"] == 10 - max(save_at, 4)
    gradient_bytes = comms["all_reduce"]["bytes"] - 4
    assert gradient_bytes == (4 - save_at) * whole["comms"]["all_reduce"]["bytes"] // 4 if save_at < 4 else \
        gradient_bytes == 0, comms
    if save_at < 4:
        assert max_rel_diff(resumed["params"], whole["params"]) == 0.0
    else:
        _, again = train(2, tmp_path, "again", stage=0, until=10, load=ckpt, onebit_freeze=4)
        assert max_rel_diff(again["params"], resumed["params"]) == 0.0
        assert max_rel_diff(resumed["params"], whole["params"]) > 0.0


@pytest.mark.parametrize("save_at", [2, 6])
def test_zero_one_adam_resumes_with_its_intervals(tmp_path, save_at):
    # var_freeze_step 4, var_update_scaler 2, local_step_scaler 2, local_step_clipper 4: variance
    # steps 1, 2, 4 (step 3 compressed), then local steps with synchronisations at 5, 6, 8 and
    # skipped rounds at 7, 9, 10. Saved at step 2 (nothing compressed yet, so no error buffer to
    # lose) the resume is bitwise the uninterrupted run: the interval counters came back. Saved at
    # the synchronisation of step 6, the intervals come back too (the same rounds are skipped),
    # the error buffers restart at zero, and two resumes agree bitwise.
    ckpt = tmp_path / "ckpt"
    kw = dict(stage=0, onebit_freeze=4, compressed="ZeroOneAdam")
    _, whole = train(2, tmp_path, "whole", until=10, **kw)
    train(2, tmp_path, "first", until=save_at, save_at=[save_at], save_dir=ckpt, **kw)
    _, resumed = train(2, tmp_path, "resumed", until=10, load=ckpt, **kw)
    assert whole["skipped_rounds"] == 3 and resumed["skipped_rounds"] == 3, (whole["skipped_rounds"],
                                                                             resumed["skipped_rounds"])
    if save_at == 2:
        assert max_rel_diff(resumed["params"], whole["params"]) == 0.0
    else:
        _, again = train(2, tmp_path, "again", until=10, load=ckpt, **kw)
        assert max_rel_diff(again["params"], resumed["params"]) == 0.0


@pytest.mark.parametrize("save_at", [3, 6])
def test_onebit_lamb_resumes_with_its_frozen_coefficients(tmp_path, save_at):
    # freeze_step 4. Before it the resume is bitwise. After it the frozen LAMB coefficients, the
    # last factors and the momentum scaling come back from the checkpoint: the resumed run keeps
    # training (a coefficient lost to zero would leave the weights where they were saved), and two
    # resumes agree bitwise. (How far it lands from the uninterrupted run says little: the error
    # buffers restarted, and with the variance frozen after 4 steps a sign bit moves an element
    # whose variance is still tiny a long way, in either run.)
    ckpt = tmp_path / "ckpt"
    kw = dict(stage=0, onebit_freeze=4, compressed="OneBitLamb")
    _, whole = train(2, tmp_path, "whole", until=10, **kw)
    _, first = train(2, tmp_path, "first", until=save_at, save_at=[save_at], save_dir=ckpt, **kw)
    _, resumed = train(2, tmp_path, "resumed", until=10, load=ckpt, **kw)
    if save_at < 4:
        assert max_rel_diff(resumed["params"], whole["params"]) == 0.0
    else:
        assert max_rel_diff(resumed["params"], first["params"]) > 1e-3
        _, again = train(2, tmp_path, "again", until=10, load=ckpt, **kw)
        assert max_rel_diff(again["params"], resumed["params"]) == 0.0
