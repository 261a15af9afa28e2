"""DeepSpeed's deepspeed.utils.groups for Zeal: the expert-parallel and data-parallel accessors,
answered from the mesh (zeal.mesh, docs/architecture.md "One mesh"). For tensor-expert-data
parallelism build the mesh first (zeal.mesh.build(expert=E, tensor=T)) and cut the tensor-parallel
layers from its tensor group: MoE layers of ep_size E then use that mesh.

DeepSpeed keeps module-level dicts of process groups keyed "ep_size_<n>". Here a name is only a
handle on the mesh `zeal.mesh.build(expert=n)` cut: the expert-parallel group is that mesh's
expert axis (consecutive ranks, as DeepSpeed's default "expert before data" layout), the
expert-data-parallel group is the group an expert's gradient reduces over (the mesh's other
sample axes: ranks holding the same experts), and the data-parallel group is the group a dense
parameter reduces over. Building a mesh is collective over the world, so every rank creates the
same groups in the same order (MoE layers do it in construction order).
"""
from .. import _zeal

_named = {}  # "ep_size_<n>" -> the ProcessGroups of the mesh with expert axis n


def _world():
    return _zeal.world()


def _ensure_divisibility(numerator, denominator):
    if numerator % denominator:
        raise _zeal.ConfigError(f"{numerator} is not divisible by {denominator}")


def _create_expert_and_data_parallel(expert_parallel_size_, mp_size=None, pp_size=None, mp_mode="tp",
                                     use_data_before_expert_parallel_=False, folding_spec=None):
    """The expert-parallel groups of size `expert_parallel_size_` and their expert-data groups:
    world 8, ep 2 -> expert groups [0,1] [2,3] [4,5] [6,7], expert-data groups [0,2,4,6] [1,3,5,7]."""
    from .. import mesh

    n = int(expert_parallel_size_)
    if use_data_before_expert_parallel_:
        raise _zeal.ConfigError("use_data_before_expert_parallel_=True (expert groups strided across the data "
                                "ranks) is not supported: Zeal's mesh puts the expert axis inside data "
                                "(DeepSpeed's default layout)")
    if (mp_size or 1) != 1 or (pp_size or 1) != 1 or folding_spec is not None:
        raise _zeal.ConfigError("expert groups over tensor or pipeline parallelism come from zeal.mesh.build("
                                "expert=, tensor=, pipe=); mp_size / pp_size / folding_spec are not taken here")
    world = _world().size
    if n < 1 or world % n:
        raise _zeal.ConfigError(f"expert parallel size {n} must divide the world size {world}")
    name = f"ep_size_{n}"
    # The newest mesh built with this expert axis (zeal.mesh.build(expert=, tensor=) for
    # tensor-expert-data parallelism) is the one; else expert x data over the world.
    built = [g for g in mesh._built if g.mesh.axis_size("expert") == n and n > 1]
    _named[name] = built[-1] if built else _named.get(name) or mesh.build(expert=n)
    return _named[name]


def _groups_of(group_name):
    if group_name not in _named:
        raise _zeal.ConfigError(f"expert parallel group {group_name!r} is not initialized (an MoE layer with that "
                                f"ep_size creates it; known: {sorted(_named) or 'none'})")
    return _named[group_name]


def _expert_data_axes(groups):
    return _zeal.reduction_axes(groups.mesh, ["expert"])


def _get_expert_parallel_group(group_name):
    return _groups_of(group_name).group("expert")


def _get_expert_parallel_group_ranks(group_name):
    g = _groups_of(group_name)
    return list(g.mesh.group_of(["expert"], g.rank))


def _get_expert_parallel_group_dict():
    return {name: g.group("expert") for name, g in _named.items()}


def _get_expert_data_parallel_group(group_name):
    g = _groups_of(group_name)
    return g.group(_expert_data_axes(g))


def _get_expert_data_parallel_group_ranks(group_name):
    g = _groups_of(group_name)
    return list(g.mesh.group_of(_expert_data_axes(g), g.rank))


def _get_expert_data_parallel_group_dict():
    return {name: _get_expert_data_parallel_group(name) for name in _named}


def _get_max_expert_size():
    return max((int(name.split("_")[2]) for name in _named), default=None)


def _get_max_expert_size_name():
    return f"ep_size_{_get_max_expert_size()}"


def _get_max_expert_parallel_group():
    return _get_expert_parallel_group(_get_max_expert_size_name())


def _get_expert_parallel_world_size(group_name):
    return _get_expert_parallel_group(group_name).size


def _get_expert_parallel_rank(group_name):
    return _get_expert_parallel_group(group_name).rank


def _get_expert_parallel_src_rank(group_name):
    return _get_expert_parallel_group_ranks(group_name)[0]


def _get_expert_data_parallel_world_size(group_name):
    return _get_expert_data_parallel_group(group_name).size


def _get_expert_data_parallel_rank(group_name):
    return _get_expert_data_parallel_group(group_name).rank


def _get_expert_broadcast_src_rank(group_name):
    return _get_expert_data_parallel_group_ranks(group_name)[0]


def _get_expert_model_parallel_world_size():
    return 1


def _get_data_parallel_group():
    """The group a dense parameter reduces over: the world (every rank holds the dense weights)."""
    return _world()


def _get_data_parallel_group_ranks():
    return list(range(_world().size))


def _get_data_parallel_world_size():
    return _world().size


def _get_data_parallel_rank():
    return _world().rank


def _get_broadcast_src_rank():
    return 0


def _get_model_parallel_world_size():
    return 1


def _clone_world_group():
    return _world()


# Sequence parallelism (zeal.sequence; docs/long_sequences.md). The sequence-parallel group is the
# ranks holding one sample's sequence: the mesh's ring x sequence axes (sequence alone without a
# ring), consecutive ranks as DeepSpeed's. The mesh is the newest one built with such an axis
# (zeal.mesh.build(sequence=S), or parallel_state_sp.initialize_sequence_parallel(S)).

_SEQUENCE_AXES = ["ring", "sequence"]


def _sequence_mesh():
    from .. import mesh

    built = [g for g in mesh._built if g.mesh.size_of(_SEQUENCE_AXES) > 1]
    return built[-1] if built else None


def _get_sequence_parallel_group():
    g = _sequence_mesh()
    if g is None:
        raise KeyError("No sequence parallel group found")
    return g.group(_SEQUENCE_AXES)


def _get_sequence_parallel_world_size():
    g = _sequence_mesh()
    return 1 if g is None else g.mesh.size_of(_SEQUENCE_AXES)


def _get_sequence_parallel_rank():
    g = _sequence_mesh()
    return 0 if g is None else g.group(_SEQUENCE_AXES).rank


def _get_sequence_data_parallel_group():
    """The ranks a dense gradient reduces over and ZeRO partitions over: data x ring x sequence."""
    g = _sequence_mesh()
    return _get_data_parallel_group() if g is None else g.group(_zeal.reduction_axes(g.mesh, []))


def _get_sequence_data_parallel_world_size():
    return _get_sequence_data_parallel_group().size


def _get_sequence_data_parallel_rank():
    return _get_sequence_data_parallel_group().rank
