"""The mesh of a job: every parallel axis (pipe, data, data_inner, expert, ring, sequence, tensor) on one
grid of ranks, and the communicators cut from it once (C++ zeal/parallel/mesh.h and
process_groups.h; docs/architecture.md "One mesh").

Everything that needs a group asks here: zeal.initialize, the pipeline engine, the tensor-parallel
`make_groups`, zero.Init. `build(...)` gives the ProcessGroups for a shape, cutting them the first
time that shape is asked for and handing back the same object after, so two parts of one job that
ask for the same layout share one set of communicators. Building is collective over the world:
every rank asks for the same shapes in the same order.

Where a parameter lives on the mesh is a tag the engine reads (Note [Parameter placement] in
zeal/parallel/placement.h): `placement_of(p)` says which axes the parameter is split over
(a tensor-parallel slice: "tensor"; an expert: "expert") and, for a weight tied across pipeline
stages, which stages hold it. From that the engine derives, in C++, the group that reduces its
gradient and the ranks that count it in the global norm.
"""
from . import _zeal

_built = []  # every ProcessGroups this process cut, the one asked for most recently last (few: one per shape)


def build(pipe=1, data=None, expert=1, sequence=1, tensor=1, data_inner=1, ring=1, world=None):
    """The ProcessGroups of the default-ordered mesh of these sizes over `world` (the process's
    world by default); `data` defaults to what the other axes leave of the world."""
    world = world or _zeal.world()
    others = pipe * expert * ring * sequence * tensor * data_inner
    if data is None:
        if others < 1 or world.size % others:
            raise ValueError(f"the mesh's axes (pipe {pipe} x data_inner {data_inner} x expert {expert} x ring {ring} x "
                             f"sequence {sequence} x tensor {tensor} = {others} ranks) must divide the world size "
                             f"{world.size}")
        data = world.size // others
    return of(_zeal.Mesh.with_sizes(pipe=pipe, data=data, expert=expert, sequence=sequence, tensor=tensor,
                                    data_inner=data_inner, ring=ring), world)


def of(mesh, world=None):
    """The ProcessGroups of `mesh` (a zeal._zeal.Mesh) over `world`, cut once per process."""
    world = world or _zeal.world()
    if mesh.world_size != world.size:
        raise ValueError(f"{mesh!r} holds {mesh.world_size} ranks, but the world has {world.size}")
    for groups in _built:
        if groups.mesh == mesh and groups.world == world:
            _built.remove(groups)  # newest first asked last: DeepSpeed's accessors answer from it
            _built.append(groups)
            return groups
    groups = _zeal.ProcessGroups(mesh, world)
    _built.append(groups)
    return groups


def owner(group):
    """(ProcessGroups, axes) for a communicator one of this process's meshes cut, else (None, None)."""
    for groups in reversed(_built):
        axes = groups.axes_of(group)
        if axes is not None:
            return groups, axes
    return None, None


def ranks_of(group):
    """The world ranks of a communicator: the world's, or those of a group one of this process's
    meshes cut; None for a communicator Zeal did not cut."""
    world = _zeal.world()
    if group == world:
        return list(range(world.size))
    groups, axes = owner(group)
    return None if groups is None else list(groups.mesh.group_of(axes, groups.rank))


def placement_of(param, tied_stages=None):
    """The engine's tag for a parameter: the axes it is split over, and the stages sharing a tied copy."""
    split = list(getattr(param, "zeal_split_axes", ()))
    if getattr(param, "tensor_parallel", False) and "tensor" not in split:
        split.append("tensor")
    out = {"split": split}
    if tied_stages:
        out["tied_stages"] = list(tied_stages)
    return out
