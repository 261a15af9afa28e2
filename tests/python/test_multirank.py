"""Multi-rank behaviour with real processes: timeouts, data sharding, the launcher."""
import re
import time

import pytest

from conftest import RANKS, run_launcher, run_mpi


def test_skipped_collective_names_the_missing_rank():
    proc = run_mpi(3, "skip_collective.py", check=False, timeout=120)
    # A print's text and newline are separate writes, so records from two ranks can share a line.
    lines = [line for line in proc.stdout.replace("RESULT", "\nRESULT").splitlines() if line.startswith("RESULT")]
    for rank in (0, 2):
        timeout = [line for line in lines if line.startswith(f"RESULT rank {rank} timeout")]
        assert timeout, proc.stdout + proc.stderr
        message = timeout[0]
        assert "all_reduce" in message and "group world" in message
        assert "did not arrive: [1]" in message
        waited = float(re.search(r"after ([\d.]+)s", message).group(1))
        assert waited < 10, message
        assert any(line.startswith(f"RESULT rank {rank} next-op-refused") for line in lines)
    assert not any("completed-unexpectedly" in line for line in lines)


def test_loader_shards_the_dataset_across_ranks():
    proc = run_mpi(2, "loader_shard.py")
    shards = {}
    # mpirun merges the ranks' output; a print's text and its newline are separate writes, so
    # match records anywhere rather than line by line.
    for rank, sizes, indices in re.findall(r"SHARD rank (\d) sizes \[([\d, ]*)\] indices ([\d,]+)", proc.stdout):
        assert sizes == "5"
        shards[int(rank)] = [int(v) for v in indices.strip(",").split(",")]
    assert set(shards) == {0, 1}
    assert len(shards[0]) == len(shards[1]) == 20
    assert sorted(shards[0] + shards[1]) == list(range(40))


def test_launcher_sets_rank_variables_and_prefixes_output():
    proc = run_launcher(3, RANKS / "launcher_probe.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probes = sorted(line for line in proc.stdout.splitlines() if "PROBE" in line)
    assert len(probes) == 3
    for rank, line in enumerate(probes):
        assert line.startswith(f"[rank{rank}]: PROBE RANK={rank} WORLD_SIZE=3 LOCAL_RANK={rank}"), line
        assert "MASTER_ADDR=127.0.0.1" in line and "MASTER_PORT=29500" in line


def test_launcher_stops_all_ranks_and_names_the_failed_one():
    start = time.monotonic()
    proc = run_launcher(3, RANKS / "launcher_probe.py", "--fail_rank", 1, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "zeal: rank 1 on localhost failed with exit code 3" in proc.stderr
    assert "[rank1]: failing on purpose" in proc.stderr
    assert elapsed < 50, f"the other ranks were not stopped ({elapsed:.0f}s)"



def _torchrun(num_ranks, script, *args, port, timeout=180):
    import subprocess
    import sys

    from conftest import mpi_env

    env = mpi_env()
    for key in [k for k in env if k.startswith("OMPI_COMM_WORLD")]:
        del env[key]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_ranks), "--master_port", str(port),
           str(RANKS / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_started_ranks_form_a_world():
    proc = _torchrun(3, "torchrun_probe.py", port=29581)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.replace("TORCHRUN", "\nTORCHRUN").splitlines() if line.startswith("TORCHRUN"))
    assert lines == [f"TORCHRUN rank {r}/3 sum 6" for r in range(3)]


def test_torchrun_training_matches_torch(tmp_path):
    import sys

    import torch

    sys.path.insert(0, str(RANKS))
    import common

    out = tmp_path / "params.pt"
    proc = _torchrun(2, "dp_train.py", "--steps", 10, "--micro", 4, "--gas", 2, "--out", out, port=29582)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = common.reference_run(10, 16, lr=1e-2, weight_decay=0.01, clip=0.0)
    got = torch.load(out)["params"]
    diff = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
    assert diff <= 1e-5, diff


def test_rendezvous_names_ranks_that_never_started():
    # Only rank 0 of a world of 3 starts: the rendezvous must time out naming ranks 1 and 2.
    import subprocess
    import sys

    from conftest import mpi_env

    env = mpi_env()
    env.update(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29583")
    code = "import zeal\ntry:\n    zeal.world(timeout_s=3)\nexcept zeal.TimeoutError as e:\n    print('RDV', e)\n"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "RDV rendezvous: ranks that did not arrive" in proc.stdout, proc.stdout + proc.stderr
    assert "[1, 2] of a world of 3" in proc.stdout
    assert time.monotonic() - start < 30


def test_readme_python_example_trains_on_two_ranks():
    import shutil
    import subprocess

    from conftest import ROOT, mpi_env

    proc = subprocess.run([shutil.which("zeal"), "--num_procs", "2", "examples/python/train_mlp.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(m) for m in re.findall(r"\[rank0\]: epoch \d: loss ([\d.]+)", proc.stdout)]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], proc.stdout
    assert "steps 80" in proc.stdout  # 1024 samples / 64 per step x 5 epochs


def test_engine_backward_names_a_rank_that_skipped_it():
    start = time.monotonic()
    proc = run_mpi(2, "engine_skip.py", check=False, timeout=120)
    text = proc.stdout.replace("RESULT", "\nRESULT")
    rank0 = [line for line in text.splitlines() if line.startswith("RESULT rank 0 step 2:")]
    assert rank0, proc.stdout + proc.stderr
    assert "all_reduce" in rank0[0] and "did not arrive: [1]" in rank0[0]
    assert "finished-unexpectedly" not in text
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("ranks,layouts", [(2, "2:1,2:2,1:1,1:2,2:2:d"), (4, "2:2,4:1,4:2,2:1:d,4:2:d")])
def test_moe_layer_trains_equal_to_a_dense_torch_reference(run_ranks, tmp_path, ranks, layouts):
    # zeal.moe's MoE (4 experts, top-1 and top-2) at expert-parallel sizes ep (data = ranks / ep),
    # ZeRO 0-3: every step's loss and every parameter (each expert by its global id) equal one torch
    # process computing the same gating with every expert on every token (ranks/moe_engine.py);
    # ":d" layouts use the dropless dispatch (uneven all-to-all of only the routed rows). Also a
    # fixed router sending all of rank 0's tokens to the last rank (no hang, equal to torch).
    # At 4 ranks also: a checkpoint saved at ep 2 / ZeRO 1 resumes at ep 4 / ZeRO 2, ep 1 / ZeRO 0
    # and ep 2 / ZeRO 3 on the reference's trajectory; its fp32 export names every expert globally;
    # models of 2 or 8 experts are refused by parameter name.
    # At 4 ranks also DeepSpeed-TED: expert 2 x tensor 2 with Duplicate Token Dropping (half the
    # all-to-all bytes), experts whole or tensor-parallel, ZeRO 0-3.
    extra = ["--tmp", str(tmp_path), "--ted"] if ranks == 4 else []
    proc = run_ranks(ranks, "moe_engine.py", "--layouts", layouts, *extra, timeout=300)
    assert proc.stdout.count("MOE-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,layouts", [(2, "2:4,2:3,2:4:vocab,1x2:1"),
                                            (4, "2:4,4:4,2:3,4:4:vocab,1x4:2,2x2:2,2x2:3")])
def test_sequence_parallel_training_equals_the_whole_sequence(run_ranks, ranks, layouts):
    # A tiny causal transformer with its sequence split over Ulysses degree 2 or 4 (data = ranks /
    # degree), ring attention at degree 2 and 4 (above the head count: 1 or 2 heads), hierarchical
    # (Ulysses 2 inside, ring 2 across), ZeRO 0-3, 4 heads or 3 (uneven), zeal's sharded
    # cross-entropy or DeepSpeed's vocab_sequence_parallel_cross_entropy, samples padded to
    # different lengths: every step's loss, the first step's gradients and the final parameters
    # equal one torch process holding the whole sequence (ranks/seq_engine.py); the exchange's
    # layouts, DeepSpeed's group accessors, the config's sequence_parallel_size.
    proc = run_ranks(ranks, "seq_engine.py", "--layouts", layouts, timeout=300)
    assert proc.stdout.count("SEQ-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,args", [(2, ["--sp", "2"]), (2, ["--sp", "2", "--tiled", "--checkpoint"]),
                                         (4, ["--sp", "4", "--checkpoint"]), (4, ["--sp", "2", "--tiled"])])
def test_huggingface_llama_with_ulysses_equals_the_whole_sequence(run_ranks, ranks, args):
    # ALST on a tiny transformers Llama (4 heads, 2 key/value heads; built from a config): the
    # attention adapter registered with transformers, the data-loader adapter's shards, the mpu
    # into zeal.initialize; at degree 4 the key/value heads are repeated; --tiled: TiledMLP and
    # TiledFusedLogitsLoss; --checkpoint: transformers' activation checkpointing (the all-to-alls
    # rerun in backward; with a GPU the hidden states offloaded to host memory). ZeRO 0-3, every step's loss, the first gradients and the final weights
    # equal one torch process on the whole sequence (ranks/hf_seq.py).
    pytest.importorskip("transformers")
    proc = run_ranks(ranks, "hf_seq.py", *args, timeout=300)
    assert proc.stdout.count("HF-SEQ-OK") == ranks, proc.stdout + proc.stderr


def test_engines_take_their_groups_from_the_mesh_and_their_parameters_placement(run_ranks, tmp_path):
    # 4 ranks as data 2 x sequence 2: dense weights reduce over all four, weights split over
    # sequence over their data pair with the norm summed across the halves, and one model with both
    # (two sharded-state units in one engine), at ZeRO 0-3, each equal to torch (ranks/mesh_engine.py).
    proc = run_ranks(4, "mesh_engine.py", "--tmp", str(tmp_path), timeout=400)
    assert proc.stdout.count("MESH-OK") == 4, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,hpz", [(2, 2), (3, 1), (4, 2)])
def test_frozen_parameters_partitioned_and_stored_quantized(run_ranks, tmp_path, ranks, hpz):
    # Stage 3 partitions frozen parameters (this rank's bytes measured), released between uses, and
    # the run equals torch whether initialize gets only the trainable parameters (as a LoRA script
    # passes them) or all; zero_quantized_nontrainable_weights stores their chunks as 8-bit blocks
    # (the bytes are the wire size) and equals torch computing with them quantized once per chunk,
    # with qwZ and hpZ too; checkpoints carry the frozen values both ways, the 16-bit state dict
    # has them whole, a GatheredParameters modifier lasts, and a zero.Init-built model frozen
    # afterwards trains exactly (ranks/zeropp_frozen.py).
    proc = run_ranks(ranks, "zeropp_frozen.py", "--hpz", hpz, "--checkpoints", tmp_path, timeout=300)
    assert proc.stdout.count("FROZEN-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,hpz,mics", [(2, 2, 1), (3, 1, -1), (4, 2, 2)])
def test_zeropp_equals_torch_on_what_it_delivers(run_ranks, tmp_path, ranks, hpz, mics):
    # ZeRO++ qwZ (zero_quantized_weights): each rank's chunk travels as 8-bit blocks; the run equals
    # torch computing with exactly those weights (chunks padded per rank count, blocks cut by
    # partitions, parameters of 1, 7, 8, 9, 72 and 4099 elements), and qwZ off equals exact torch.
    # hpZ (zero_hpz_partition_size) alone equals exact torch (2 "nodes" of 2 ranks, and 1 of 2), and
    # with qwZ the quantized reference; qgZ (zero_quantized_gradients) equals torch whose reduction
    # is simulated hop for hop (one level, and over the nodes; 1-D gradients exact, as DeepSpeed's);
    # hpZ with offload_param cpu is exact; the comms_logger's bytes off the node;
    # checkpoints saved with ZeRO++ load without it and the reverse; LoCo (zeropp_loco_param) equals
    # the reference carrying every rank's errors, resets every reset_T steps and resumes from a
    # checkpoint; MiCS (mics_shard_size: shard groups of 1 and 2, replicated) is exact, with qwZ
    # equals the reference quantizing per shard group, and its checkpoints load without it and the
    # reverse (ranks/zeropp.py).
    proc = run_ranks(ranks, "zeropp.py", "--hpz", hpz, "--mics", mics, "--checkpoints", tmp_path, timeout=300)
    assert proc.stdout.count("ZEROPP-OK") == ranks, proc.stdout + proc.stderr
