"""DeepSpeed's deepspeed.runtime.sequence_parallel.parallel_state_sp: the "mpu" of a sequence-parallel
job, answered from the mesh. `initialize_sequence_parallel(S)` builds the mesh with a sequence axis
of S (consecutive ranks, data = world / S); pass this module as `mpu=` to zeal.initialize, or not at
all (the engine finds the mesh the model's sequence layers use, or builds it from the config's
sequence_parallel_size)."""
from .. import _zeal

_groups = None


def initialize_sequence_parallel(sequence_parallel_size):
    from .. import mesh

    global _groups
    world = _zeal.world().size
    sp = int(sequence_parallel_size)
    if world < sp:
        raise _zeal.ConfigError(f"world_size ({world}) is less than sequence_parallel_size {sp}")
    if sp <= 1:
        raise _zeal.ConfigError(f"sequence_parallel_size must be greater than 1, got {sp}")
    if world % sp:
        raise _zeal.ConfigError(f"world_size ({world}) is not divisible by sequence_parallel_size {sp})")
    groups = mesh.build(sequence=sp)
    if _groups is not None and _groups is not groups:
        raise _zeal.ConfigError("sequence parallel group is already initialized (with sequence_parallel_size "
                                f"{_groups.mesh.axis_size('sequence')})")
    _groups = groups
    return groups


def _get():
    if _groups is None:
        raise _zeal.ConfigError("sequence parallel group is not initialized (initialize_sequence_parallel)")
    return _groups


def get_sequence_parallel_group():
    return _get().group("sequence")


def get_sequence_parallel_world_size():
    return _get().mesh.axis_size("sequence")


def get_sequence_parallel_rank():
    return _get().group("sequence").rank


def get_sequence_data_parallel_group():
    return _get().group(["data", "sequence"])


def get_sequence_data_parallel_world_size():
    return get_sequence_data_parallel_group().size


def get_sequence_data_parallel_rank():
    return get_sequence_data_parallel_group().rank


get_model_parallel_group = get_sequence_parallel_group
get_model_parallel_world_size = get_sequence_parallel_world_size
get_model_parallel_rank = get_sequence_parallel_rank


def _zeal_mesh_groups():
    """The engine's hook: the mesh this mpu stands for."""
    return _get()
