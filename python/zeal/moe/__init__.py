"""DeepSpeed's deepspeed.moe on Zeal: the MoE layer, its gating and dispatch, and the optimizer
parameter-group helpers (docs/moe.md)."""
from . import experts, layer, sharded_moe, utils  # noqa: F401
from .layer import MoE  # noqa: F401
