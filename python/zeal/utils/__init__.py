"""DeepSpeed's deepspeed.utils for Zeal engines: the ZeRO debugging API (full values of a
parameter's gradient, fp32 master weights and optimizer state, at every ZeRO stage), the
RepeatingLoader and set_random_seed.

The full-value functions are collective over the parameter's data-parallel ranks when the value
is partitioned (ZeRO stage >= 1 for weights and state, >= 2 for gradients): every rank calls them
for the same parameter, as with DeepSpeed's. Gradients are available between backward on the
accumulation boundary and step (step consumes them).
"""
import logging
import random

import torch

from .. import _zeal

logger = logging.getLogger("zeal")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_dist(message, ranks=None, level=logging.INFO):
    """Logs on the listed ranks (DeepSpeed's: [-1] means every rank; None or [] means none)."""
    ranks = ranks or []
    my_rank = _zeal.world().rank
    if ranks and (ranks[0] == -1 or my_rank in set(ranks)):
        logger.log(level, f"[Rank {my_rank}] {message}")


def _owner(param):
    owner = getattr(param, "_zeal_owner", None)
    if owner is None:
        raise _zeal.Error("this tensor is not a parameter a Zeal engine trains (pass one of the model's "
                          "parameters after zeal.initialize; frozen parameters have no engine state)")
    core = owner[0]()
    if core is None:
        raise _zeal.Error("the engine that trained this parameter no longer exists")
    return core, owner[1]


def safe_get_full_grad(param):
    """The whole, reduced gradient of `param` (fp32); param.grad itself when the engine keeps it
    whole (ZeRO stage 0 and 1)."""
    if param.grad is not None:
        return param.grad
    core, i = _owner(param)
    return core.full_value(i, "grad")


def safe_get_full_fp32_param(param):
    """The whole fp32 master value of `param`."""
    core, i = _owner(param)
    return core.full_value(i, "fp32")


def safe_set_full_fp32_param(param, value):
    """Sets the fp32 master value of `param` (and the model's parameter) to `value`, which every
    rank passes alike. Collective."""
    core, i = _owner(param)
    core.set_full_value(i, "fp32", value)


def safe_get_full_optimizer_state(param, optim_state_key):
    """The whole optimizer state `optim_state_key` (e.g. "exp_avg", "exp_avg_sq") of `param`."""
    core, i = _owner(param)
    return core.full_value(i, optim_state_key)


def safe_set_full_optimizer_state(param, value, optim_state_key):
    core, i = _owner(param)
    core.set_full_value(i, optim_state_key, value)


class RepeatingLoader:
    """Iterates a loader forever, starting it again when it runs out (DeepSpeed's, for
    PipelineEngine.train_batch(data_iter=...))."""

    def __init__(self, loader):
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def set_random_seed(seed):
    """Seeds Python's, NumPy's (when installed) and torch's generators, as DeepSpeed's."""
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed % 2**63)


# --- ZeRO-3 leaf modules (DeepSpeed's set_z3_leaf_modules) --------------------------------------
# A leaf module's parameters, its descendants' included, are gathered together when it starts and
# released when it ends; its submodules get no hooks of their own. For modules whose forward does
# not call every submodule every time (a Mixture-of-Experts layer routes tokens to some experts),
# so the ranks still gather the same parameters in the same order.

def set_z3_leaf_modules(model, leaf_module_classes):
    """Marks every submodule of `model` whose class is in leaf_module_classes (classes or class
    names) as a ZeRO-3 leaf; returns the marked modules. Call it before initialize."""
    wanted = list(leaf_module_classes)
    marked = []
    for module in model.modules():
        if any((isinstance(c, type) and isinstance(module, c)) or type(module).__name__ == c for c in wanted):
            module._z3_leaf = True
            for p in module.parameters():
                p.ds_z3_leaf_module = module
            marked.append(module)
    if not marked:
        raise ValueError(f"set_z3_leaf_modules: no module of {wanted} in the model")
    return marked


def unset_z3_leaf_modules(model, leaf_module_classes):
    unmarked = []
    for module in model.modules():
        if getattr(module, "_z3_leaf", False) and any(
                (isinstance(c, type) and isinstance(module, c)) or type(module).__name__ == c for c in leaf_module_classes):
            module._z3_leaf = False
            unmarked.append(module)
    return unmarked


def z3_leaf_module(module):
    return getattr(module, "_z3_leaf", False)


def get_z3_leaf_modules(model):
    return [m for m in model.modules() if z3_leaf_module(m)]


def z3_leaf_parameter(param):
    return getattr(param, "ds_z3_leaf_module", None) is not None
