"""Tensor parallelism (zeal.tensor_parallel): Megatron-style layers and the vocabulary-parallel
cross-entropy, trained through a Zeal engine over the data group, against one torch process."""
import pytest

from conftest import run_mpi


# 10 steps of a small language model; every step's loss and every final shard equal to the
# single-process model's (its slice) to 1e-5 relative.
@pytest.mark.parametrize("ranks,tensor,args", [
    (1, 1, []),
    (2, 2, []),
    (4, 4, []),
    (4, 2, []),             # tensor 2 x data 2
    (4, 2, ["--zero", 1]),  # with ZeRO-1 over the data group
])
def test_tensor_parallel_matches_torch(ranks, tensor, args):
    proc = run_mpi(ranks, "tp_train.py", "--tensor", tensor, *args, timeout=240)
    assert proc.stdout.count("TP-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,tensor", [(2, 2), (4, 2)])
def test_clipping_uses_the_whole_model_s_norm(ranks, tensor):
    # Shards' squares are summed over the tensor group and replicated parameters (LayerNorm, the
    # row-parallel bias) counted once: every step's norm equals torch's clip_grad_norm_ on the whole
    # model (1e-5), and the clipped training still matches it.
    proc = run_mpi(ranks, "tp_train.py", "--tensor", tensor, "--clip", 0.5, timeout=240)
    assert proc.stdout.count("TP-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,tensor,args", [
    (2, 2, []),
    (4, 4, []),
    (4, 2, ["--zero", 1, "--clip", 0.5]),
])
def test_sequence_parallel_regions_match_torch(ranks, tensor, args):
    # The embedding reduce-scatters over the sequence, the LayerNorm and residual work on each
    # rank's part of it, the column-parallel layers all-gather it and the row-parallel one
    # reduce-scatters: the same losses, norms and weights as one torch process (1e-5). Without the
    # hook that sums the LayerNorm's gradients over the group, step 1 is already off by 6e-4.
    proc = run_mpi(ranks, "tp_train.py", "--tensor", tensor, "--sequence_parallel", *args, timeout=240)
    assert proc.stdout.count("TP-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks,tensor,args", [(2, 2, []), (4, 2, []), (4, 4, ["--clip", 0.5]),
                                               (2, 2, ["--sequence_parallel"]),
                                               (4, 4, ["--sequence_parallel", "--clip", 0.5])])
def test_demo_gpt_tensor_parallel_variant_matches_the_full_gpt(ranks, tensor, args):
    # examples/python/gpt.py's TensorParallelGPT, cut from a full GPT (heads and MLP split, the
    # vocabulary-parallel embedding, head and cross-entropy), trains like that GPT in one process.
    proc = run_mpi(ranks, "gpt_tp.py", "--tensor", tensor, *args, timeout=240)
    assert proc.stdout.count("GPT-TP-OK") == ranks, proc.stdout + proc.stderr


@pytest.mark.parametrize("loaded", [
    (4, ["--tensor", 2, "--micro", 4]),                      # the same layout
    (4, ["--tensor", 4, "--micro", 8]),                      # tensor 2 x data 2 -> tensor 4
    (2, ["--tensor", 2, "--micro", 8, "--zero", 1]),         # -> tensor 2 x data 1, ZeRO-1
    (4, ["--tensor", 1, "--micro", 2, "--zero", 2]),         # -> data 4 (tensor-parallel layers of size 1), ZeRO-2
    (4, ["--tensor", 1, "--micro", 2, "--plain"]),           # -> plain torch layers over data 4
    (1, ["--tensor", 1, "--micro", 8, "--plain"]),           # -> one plain process
])
def test_checkpoints_move_between_tensor_parallel_sizes(tmp_path, loaded):
    # Saved after 6 steps at tensor 2 x data 2 (one part per tensor rank, each slice recorded with
    # its place in the full tensor), loaded at another layout with the same global batch of 8: the
    # 4 steps after the move and the final shards follow the uninterrupted torch run (1e-5), so the
    # AdamW moments moved with the weights. No conversion step.
    proc = run_mpi(4, "tp_train.py", "--tensor", 2, "--save_at", 6, "--save_dir", tmp_path, timeout=240)
    assert proc.stdout.count("SAVED step 6") == 4, proc.stdout + proc.stderr
    ranks, args = loaded
    proc = run_mpi(ranks, "tp_train.py", "--load", tmp_path, *args, timeout=240)
    assert proc.stdout.count("TP-OK") == ranks, proc.stdout + proc.stderr


def test_zeal_to_fp32_joins_tensor_parallel_slices(tmp_path):
    # The consolidated weights of a tensor 4 checkpoint are the single-process model's after the
    # same 6 steps; a checkpoint missing a tensor part is refused, naming the parameter.
    import json
    import sys

    import torch

    from conftest import RANKS
    from zeal import _zeal
    from zeal.checkpoint import to_fp32_file, to_fp32_state_dict

    proc = run_mpi(4, "tp_train.py", "--tensor", 4, "--micro", 8, "--save_at", 6, "--save_dir", tmp_path / "ckpt",
                   timeout=240)
    assert proc.stdout.count("SAVED step 6") == 4, proc.stdout + proc.stderr
    sys.path.insert(0, str(RANKS))
    import tp_train

    torch.manual_seed(7)
    ref = tp_train.Model()
    opt = torch.optim.AdamW(ref.parameters(), lr=tp_train.LR, weight_decay=tp_train.WD)
    for step in range(6):
        opt.zero_grad()
        ref(*tp_train.batch(step, 8)).backward()
        opt.step()
    want = dict(ref.named_parameters())
    got = to_fp32_state_dict(tmp_path / "ckpt")
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert ((got[name] - w.detach()).abs().max() / w.detach().abs().max()).item() <= 1e-5, name
    to_fp32_file(tmp_path / "ckpt", tmp_path / "model.safetensors")
    written = _zeal.read_safetensors(str(tmp_path / "model.safetensors"))
    for name in want:
        assert torch.equal(written[name], got[name]), name

    parts = tmp_path / "ckpt" / "global_step6" / "parts.json"
    meta = json.loads(parts.read_text())
    meta["parts"].remove("tensor2")
    parts.write_text(json.dumps(meta))
    with pytest.raises(_zeal.CheckpointError, match="parts.json fails its checksum"):  # an edit is refused
        to_fp32_state_dict(tmp_path / "ckpt")
    meta.pop("checksum")
    _zeal.write_sealed_json(str(parts), json.dumps(meta))  # resealed: the coverage check behind it still holds
    with pytest.raises(_zeal.CheckpointError, match=r"slices of parameter 'embed.weight' cover rows \[0, 16\) of "
                                                    r"the 32 along dim 0"):
        to_fp32_state_dict(tmp_path / "ckpt")


def test_a_rank_killed_while_saving_parts_keeps_the_previous_checkpoint(tmp_path):
    # ZeRO-1, so every rank writes a shard. Rank 3 (tensor rank 1, data rank 1) dies half-way
    # through its shard of the step-6 save: the other ranks stop with an error, `latest` still
    # names step 4, no step-6 directory appears, and step 4 resumes into the uninterrupted torch
    # run (at tensor 4).
    proc = run_mpi(4, "tp_train.py", "--tensor", 2, "--zero", 1, "--save_at", 4, 6, "--save_dir", tmp_path, "--kill",
                   "3:shard_half", "--timeout", 10, timeout=240, check=False)
    assert proc.returncode != 0
    assert proc.stdout.count("SAVED step 4") == 4, proc.stdout + proc.stderr
    assert "SAVED step 6" not in proc.stdout
    assert (tmp_path / "latest").read_text().strip() == "global_step4"
    assert not (tmp_path / "global_step6").exists()
    proc = run_mpi(4, "tp_train.py", "--load", tmp_path, "--tensor", 4, "--micro", 8, timeout=240)
    assert proc.stdout.count("TP-OK") == 4, proc.stdout + proc.stderr
