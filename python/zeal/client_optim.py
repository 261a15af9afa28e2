"""The user's own optimizer: a torch.optim.Optimizer passed to initialize(optimizer=...).

As DeepSpeed does with a client optimizer under ZeRO, the optimizer object is kept and its
param_groups are re-pointed: each group's "params" become views of the fp32 master elements this
rank owns (the engine's `master`, optim/client_optimizer.h), so the user's update runs over this
rank's partition while the engine does the loss scaling, overflow check, clipping, reduction and
all-gather around it. Hyperparameters stay in the user's dicts: an LR scheduler that writes
group["lr"] is what the next step uses.

The optimizer's per-element state (exp_avg, momentum_buffer, sum, ...) is kept as views of one
flat tensor per name over the master's elements: checkpoints save it with the engine's shards and
reshard it at another world size, as they do Zeal's own optimizers' state.
"""
import torch

from . import _zeal

# Optimizers DeepSpeed has tested under ZeRO (its ZERO_SUPPORTED_OPTIMIZERS); others need
# "zero_allow_untested_optimizer": true at ZeRO stage >= 1, as in DeepSpeed.
# The check is on the exact class, as DeepSpeed's: subclasses count as untested.
_TESTED = ("torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.adagrad.Adagrad", "zeal.optim.CPUAdam",
           "zeal.optim.FusedAdam", "zeal.optim.CPUAdagrad")


def qualified_name(optimizer):
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def build(optimizer, model_parameters):
    """DeepSpeed's rule: optimizer= is a torch.optim.Optimizer, or a callable that builds one from
    the model's parameters (or parameter groups)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = optimizer(model_parameters)
        if not isinstance(built, torch.optim.Optimizer):
            raise _zeal.ConfigError(f"initialize: the optimizer callable returned {type(built).__name__}, "
                                    "expected a torch.optim.Optimizer")
        return built
    raise _zeal.ConfigError(f"initialize: optimizer= must be a torch.optim.Optimizer or a callable that builds one, "
                            f"got {type(optimizer).__name__}")


def check_allowed(optimizer, cfg):
    """zero_allow_untested_optimizer and zero_force_ds_cpu_optimizer, with DeepSpeed's meaning."""
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) or 0
    name = qualified_name(optimizer)
    if stage >= 1 and name not in _TESTED and not cfg.get("zero_allow_untested_optimizer", False):
        raise _zeal.ConfigError(
            f"config key 'zero_allow_untested_optimizer': the optimizer passed to initialize ({name}) is not one "
            f"ZeRO has been tested with ({', '.join(t.rsplit('.', 1)[1] for t in _TESTED)}); set "
            "\"zero_allow_untested_optimizer\": true to use it at ZeRO stage >= 1")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if stage >= 1 and str(offload).lower() == "cpu" and cfg.get("zero_force_ds_cpu_optimizer", True) \
            and name != "zeal.optim.CPUAdam":
        raise _zeal.ConfigError(
            f"config key 'zero_force_ds_cpu_optimizer': ZeRO-Offload with an optimizer passed to initialize ({name}) "
            "runs it on the CPU unvectorised; pass zeal.optim.CPUAdam (DeepSpeedCPUAdam), configure an 'optimizer' "
            "section, or set \"zero_force_ds_cpu_optimizer\": false to run it anyway")


def engine_groups(optimizer):
    """The engine's parameter groups from the optimizer's own, in its order."""
    groups = []
    for g in optimizer.param_groups:
        group = {"params": list(g["params"]), "lr": float(g.get("lr", 0.0))}
        if isinstance(g.get("weight_decay"), (int, float)):
            group["weight_decay"] = float(g["weight_decay"])
        groups.append(group)
    return groups


class ClientAdapter:
    """The calls the engine makes into the user's optimizer (bindings: client_optimizer)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.name = qualified_name(optimizer)
        self._views = []   # (view of master, begin, end), in segment order
        self._flat = {}    # state name -> flat fp32 tensor over the master's elements
        self._master = None

    def bind(self, core):
        """Re-points the optimizer's groups at views of the engine's master elements."""
        self._master = core.master
        by_group = [[] for _ in self.optimizer.param_groups]
        for g, b, e in core.segments():
            view = self._master.narrow(0, b, e - b)
            self._views.append((view, b, e))
            by_group[g].append(view)
        for g, group in enumerate(self.optimizer.param_groups):
            # A rank that owns none of a group keeps an empty view: foreach kernels want non-empty lists.
            group["params"] = by_group[g] or [self._master.narrow(0, 0, 0)]
        self.optimizer.state.clear()  # state of the model's tensors (none before a first step) is void now

    def update(self, master, grads):
        for view, b, e in self._views:
            view.grad = grads.narrow(0, b, e - b)
        try:
            self.optimizer.step()
        finally:
            for view, _, _ in self._views:
                view.grad = None
        self._adopt_state()

    def _adopt_state(self):
        # New per-element state tensors move into the flat buffers (a copy on the first step only).
        for view, b, e in self._views:
            state = self.optimizer.state.get(view)
            if not state or view.numel() == 0:
                continue
            for name, value in list(state.items()):
                if not (torch.is_tensor(value) and value.shape == view.shape and value.dtype == torch.float32):
                    continue
                slot = self._flat_of(name).narrow(0, b, e - b)
                if value.data_ptr() != slot.data_ptr():
                    slot.copy_(value)
                    state[name] = slot

    def _flat_of(self, name):
        flat = self._flat.get(name)
        if flat is None:
            flat = self._flat[name] = torch.zeros(self._master.numel(), dtype=torch.float32,
                                                  device=self._master.device)
        return flat

    def state_names(self):
        return sorted(self._flat)

    def state(self, name):
        flat = self._flat_of(name)
        for view, b, e in self._views:
            if view.numel():
                self.optimizer.state[view][name] = flat.narrow(0, b, e - b)
        return flat

    def scalars(self):
        """Scalar state (a step count), one value per name: every view of a step holds the same."""
        out = {}
        for view, _, _ in self._views:
            for name, value in self.optimizer.state.get(view, {}).items():
                if torch.is_tensor(value) and value.dim() == 0:
                    out.setdefault(f"tensor:{str(value.dtype).replace('torch.', '')}:{name}", [float(value)])
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(f"number:{name}", [float(value)])
        return out

    def restore_scalars(self, saved):
        for key, values in saved.items():
            kind, _, rest = key.partition(":")
            for view, _, _ in self._views:
                if not view.numel():
                    continue
                if kind == "tensor":
                    dtype, _, name = rest.partition(":")
                    self.optimizer.state[view][name] = torch.tensor(values[0], dtype=getattr(torch, dtype))
                elif kind == "number":
                    self.optimizer.state[view][rest] = values[0]
