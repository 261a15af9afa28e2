"""DeepSpeed's accelerator interface (deepspeed.accelerator.get_accelerator()) for the device Zeal
trains on: CUDA when this Zeal was built with CUDA and a device is visible, else the CPU, with
DeepSpeed's CPU accelerator's answers."""
import functools
import os

import torch

from . import _zeal


class ZealAccelerator:
    def __init__(self, name):
        self._name = name
        self._communication_backend_name = "nccl" if name == "cuda" else "mpi"

    # --- devices ---
    def device_name(self, device_index=None):
        if self._name == "cpu" or device_index is None:
            return self._name
        return f"{self._name}:{device_index}"

    def device(self, device_index=None):
        return torch.device("cuda", device_index) if self._name == "cuda" else None

    def set_device(self, device_index):
        if self._name == "cuda":
            torch.cuda.set_device(device_index)

    def current_device(self):
        if self._name == "cuda":
            return torch.cuda.current_device()
        from .comm import get_local_rank

        return get_local_rank()

    def current_device_name(self):
        return f"cuda:{torch.cuda.current_device()}" if self._name == "cuda" else "cpu"

    def device_count(self):
        if self._name == "cuda":
            return torch.cuda.device_count()
        return int(os.environ.get("LOCAL_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")) or 1)

    def is_available(self):
        return True

    def synchronize(self, device_index=None):
        if self._name == "cuda":
            torch.cuda.synchronize(device_index)

    def communication_backend_name(self):
        return self._communication_backend_name

    def is_synchronized_device(self):
        return self._name == "cpu"

    def use_host_timers(self):
        return self.is_synchronized_device()

    def resolves_data_dependency(self):
        return self.is_synchronized_device()

    def handles_memory_backpressure(self):
        return self.is_synchronized_device()

    # --- dtypes ---
    def is_bf16_supported(self):
        return torch.cuda.is_bf16_supported() if self._name == "cuda" else True

    def is_fp16_supported(self):
        return True

    def supported_dtypes(self):
        return [torch.float32, torch.bfloat16, torch.float16]

    def is_triton_supported(self):
        return False

    # --- random ---
    def random(self):
        return torch.random

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def initial_seed(self):
        return torch.initial_seed()

    def get_rng_state(self, device_index=None):
        return torch.cuda.get_rng_state(device_index or 0) if self._name == "cuda" else torch.get_rng_state()

    def set_rng_state(self, new_state, device_index=None):
        if self._name == "cuda":
            torch.cuda.set_rng_state(new_state, device_index or 0)
        else:
            torch.set_rng_state(new_state)

    def default_generator(self, device_index):
        return torch.cuda.default_generators[device_index] if self._name == "cuda" else torch.default_generator

    # --- memory ---
    def empty_cache(self):
        if self._name == "cuda":
            torch.cuda.empty_cache()

    def memory_allocated(self, device_index=None):
        return torch.cuda.memory_allocated(device_index) if self._name == "cuda" else _rss()

    def max_memory_allocated(self, device_index=None):
        return torch.cuda.max_memory_allocated(device_index) if self._name == "cuda" else _peak_rss()

    def memory_reserved(self, device_index=None):
        return torch.cuda.memory_reserved(device_index) if self._name == "cuda" else _rss()

    memory_cached = memory_reserved

    def max_memory_reserved(self, device_index=None):
        return torch.cuda.max_memory_reserved(device_index) if self._name == "cuda" else _peak_rss()

    max_memory_cached = max_memory_reserved

    def reset_peak_memory_stats(self, device_index=None):
        if self._name == "cuda":
            torch.cuda.reset_peak_memory_stats(device_index)

    reset_max_memory_allocated = reset_peak_memory_stats
    reset_max_memory_cached = reset_peak_memory_stats

    def total_memory(self, device_index=None):
        if self._name == "cuda":
            return torch.cuda.get_device_properties(device_index or 0).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def available_memory(self, device_index=None):
        if self._name == "cuda":
            free, _ = torch.cuda.mem_get_info(device_index or 0)
            return free
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    # --- host memory ---
    def pin_memory(self, tensor, align_bytes=1):
        return tensor.pin_memory() if self._name == "cuda" else tensor

    def is_pinned(self, tensor):
        return tensor.is_pinned()

    def on_accelerator(self, tensor):
        return tensor.device.type == self._name

    # --- profiling ranges and graphs: no-ops on the CPU ---
    def range_push(self, msg, domain=None, category=None):
        if self._name == "cuda":
            torch.cuda.nvtx.range_push(msg)

    def range_pop(self, domain=None):
        if self._name == "cuda":
            torch.cuda.nvtx.range_pop()

    def lazy_call(self, callback):
        return callback()

    def get_compile_backend(self):
        return "inductor"

    # DeepSpeed's tensor-type properties
    FloatTensor = property(lambda self: torch.FloatTensor)
    HalfTensor = property(lambda self: torch.HalfTensor)
    BFloat16Tensor = property(lambda self: torch.BFloat16Tensor)
    DoubleTensor = property(lambda self: torch.DoubleTensor)
    LongTensor = property(lambda self: torch.LongTensor)
    IntTensor = property(lambda self: torch.IntTensor)
    ByteTensor = property(lambda self: torch.ByteTensor)


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=None)
def get_accelerator():
    """CUDA when this Zeal has CUDA and sees a device, else the CPU."""
    cuda = _zeal.with_cuda and torch.cuda.is_available() and torch.cuda.device_count() > 0
    return ZealAccelerator("cuda" if cuda else "cpu")
