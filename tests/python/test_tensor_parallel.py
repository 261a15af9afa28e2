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


@pytest.mark.parametrize("ranks,tensor,args", [(2, 2, []), (4, 2, []), (4, 4, ["--clip", 0.5])])
def test_demo_gpt_tensor_parallel_variant_matches_the_full_gpt(ranks, tensor, args):
    # examples/python/gpt.py's TensorParallelGPT, cut from a full GPT (heads and MLP split, the
    # vocabulary-parallel embedding, head and cross-entropy), trains like that GPT in one process.
    proc = run_mpi(ranks, "gpt_tp.py", "--tensor", tensor, *args, timeout=240)
    assert proc.stdout.count("GPT-TP-OK") == ranks, proc.stdout + proc.stderr
