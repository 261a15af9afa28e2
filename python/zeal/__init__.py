"""Zeal: a distributed training runtime for PyTorch models with a DeepSpeed-compatible config.

    engine, optimizer, loader, scheduler = zeal.initialize(model=model, config="configs/dp.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

A DeepSpeed script runs with `import zeal as deepspeed`: the module-level names below are
DeepSpeed's (initialize, add_config_arguments, init_distributed, comm, accelerator, utils, pipe,
zero, PipelineModule, ...); docs/compatibility.md lists each.
"""
import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _zeal
from ._zeal import CheckpointError, CommError, ConfigError, Error, InternalError, IoError, TimeoutError
from .engine import ZealEngine, initialize
from . import checkpoint, mesh, optim, pipe, tensor_parallel, zero  # noqa: E402  (zeal.checkpoint, ...)
from . import accelerator, checkpointing, comm, profiling, utils  # noqa: E402
from . import moe  # noqa: E402
from .utils import groups as _groups  # noqa: E402,F401  (zeal.utils.groups)
from .profiling import flops_profiler  # noqa: E402,F401  (zeal.profiling.flops_profiler)
from . import memory  # noqa: E402
from .memory import estimate_memory  # noqa: E402
from .accelerator import get_accelerator  # noqa: E402
from .comm import init_distributed  # noqa: E402
from .config import add_config_arguments  # noqa: E402
from .engine import EngineAPI  # noqa: E402
from .pipe import LayerSpec, PipelineEngine, PipelineModule, TiedLayerSpec  # noqa: E402
from .utils import RepeatingLoader, set_random_seed  # noqa: E402

DeepSpeedEngine = ZealEngine
DeepSpeedConfigError = ConfigError
TORCH_DISTRIBUTED_DEFAULT_PORT = 29500
__version__ = _zeal.__version__
__version_major__, __version_minor__, __version_patch__ = (int(x) for x in __version__.split(".")[:3])
__git_hash__ = _zeal.__git_hash__
__git_branch__ = _zeal.__git_branch__
version, git_hash, git_branch = __version__, __git_hash__, __git_branch__

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
    "add_config_arguments",
    "init_distributed",
    "get_accelerator",
    "PipelineModule",
    "LayerSpec",
    "TiedLayerSpec",
    "RepeatingLoader",
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
