"""DeepSpeed's activation checkpointing calls (deepspeed.checkpointing), over torch's: recompute a
function's activations in backward instead of keeping them. Partitioning and CPU offload of the
checkpointed activations (DeepSpeed's partition_activations, cpu_checkpointing) are not here yet:
asking for them is refused, not ignored."""
import torch

from . import _zeal

_configured = {"done": False}


def configure(mpu_=None, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None):
    """Accepts DeepSpeed's arguments; the ones that change where activations live are refused."""
    section = {}
    if isinstance(deepspeed_config, dict):
        section = deepspeed_config.get("activation_checkpointing", {}) or {}
    for name, value in (("partition_activations", partition_activations or section.get("partition_activations")),
                        ("checkpoint_in_cpu", checkpoint_in_cpu or section.get("cpu_checkpointing"))):
        if value:
            raise _zeal.ConfigError(f"activation checkpointing: {name} is not supported yet")
    _configured["done"] = True


def is_configured():
    return _configured["done"]


def checkpoint(function, *args):
    """function(*args), its activations recomputed in backward (torch.utils.checkpoint, non-reentrant)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def reset():
    """DeepSpeed resets its buffers between iterations; torch's checkpointing keeps none."""
