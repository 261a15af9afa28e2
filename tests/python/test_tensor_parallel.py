"""Tensor parallelism (zeal.tensor_parallel): Megatron-style layers and the vocabulary-parallel
cross-entropy, trained through a Zeal engine over the data group, against one torch process."""
import pytest
import torch

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


def test_clipping_with_tensor_parallel_layers_is_refused_for_now():
    import zeal
    from zeal import tensor_parallel as tp

    model = torch.nn.Sequential(tp.ColumnParallelLinear(4, 4))
    with pytest.raises(zeal.ConfigError, match="'gradient_clipping'.*tensor-parallel"):
        zeal.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"},
                                             "gradient_clipping": 1.0})
