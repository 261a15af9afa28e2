"""Zeal: a distributed training runtime for PyTorch models with a DeepSpeed-compatible config.

    engine, optimizer, loader, scheduler = zeal.initialize(model=model, config="configs/dp.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
"""
import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _zeal
from ._zeal import CheckpointError, CommError, ConfigError, Error, InternalError, IoError, TimeoutError
from .engine import ZealEngine, initialize
from . import checkpoint, optim, pipe, tensor_parallel, zero  # noqa: E402  (zeal.checkpoint, ...)
from . import memory  # noqa: E402
from .memory import estimate_memory  # noqa: E402

__version__ = _zeal.__version__

__all__ = [
    "initialize",
    "ZealEngine",
    "Error",
    "ConfigError",
    "CommError",
    "TimeoutError",
    "IoError",
    "CheckpointError",
    "InternalError",
    "world",
]


def world(timeout_s: float = None):
    """The process's world communicator (MPI), created on first call. timeout_s, when given, sets
    the deadline of every collective that names none (default _zeal.DEFAULT_COMMS_TIMEOUT_S; an
    engine's comms_timeout_s sets it too)."""
    return _zeal.world(timeout_s or 0.0)


def _shutdown_at_exit():
    _zeal.shutdown()


import atexit as _atexit  # noqa: E402

_atexit.register(_shutdown_at_exit)
