"""DeepSpeed's deepspeed.comm over Zeal's communicators (MPI for host tensors): the functions
training scripts call on torch tensors. `group` is a zeal Communicator (zeal.comm.new_group, or
one Zeal gave you); None means the world.

Every op goes through the Communicator, so it carries a signature and a deadline (Note
[Collective signatures], Note [One comms timeout]): a rank that skips one is named, not waited for.
async_op=True returns the Work handle (wait() / is_completed()), else None after the op is done.
"""
import enum
import os
from datetime import timedelta

import torch

from . import _zeal


class ReduceOp(enum.Enum):
    """DeepSpeed's values; Zeal's communicators reduce SUM, AVG, MIN and MAX."""
    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    BAND = 4
    BOR = 5
    BXOR = 6
    AVG = 7
    UNUSED = 8


_OPS = {ReduceOp.SUM: "sum", ReduceOp.AVG: "avg", ReduceOp.MIN: "min", ReduceOp.MAX: "max"}


def _op(op):
    if isinstance(op, str):
        return op.lower()
    if isinstance(op, ReduceOp) and op in _OPS:
        return _OPS[op]
    name = getattr(op, "name", None) or str(op)  # torch.distributed.ReduceOp.SUM and the like
    name = name.rsplit(".", 1)[-1].lower()
    if name in _OPS.values():
        return name
    raise _zeal.CommError(f"reduce op {op!r}: Zeal's communicators reduce with SUM, AVG, MIN or MAX")


def _group(group):
    return _zeal.world() if group is None else group


def _done(work, async_op):
    if async_op:
        return work
    work.wait()
    return None


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=29500, verbose=True,
                     timeout=None, init_method=None, dist_init_required=None, config=None, rank=-1, world_size=-1):
    """Starts (or finds) the MPI world, and beside it a torch.distributed (gloo) process group over
    the same ranks, as DeepSpeed's does, for code that calls torch.distributed directly (the
    Hugging Face Trainer, Accelerate, user scripts). Zeal's ranks come from mpirun, torchrun or the
    zeal launcher, so the backend, port and init_method arguments are accepted and unused; timeout
    (a timedelta or seconds) becomes the default deadline of every collective."""
    if dist_backend not in (None, "mpi", "nccl", "gloo", "ccl"):
        raise _zeal.ConfigError(f"init_distributed: dist_backend {dist_backend!r} is not one Zeal has "
                                "(MPI for host tensors, NCCL for device tensors, chosen per tensor)")
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    world = _zeal.world(float(seconds or 0.0))
    if seconds:
        _zeal.set_default_timeout(float(seconds))
    if world_size not in (-1, None) and world_size != world.size:
        raise _zeal.ConfigError(f"init_distributed: world_size={world_size}, but this job has {world.size} ranks")
    if rank not in (-1, None) and rank != world.rank:
        raise _zeal.ConfigError(f"init_distributed: rank={rank}, but this process is rank {world.rank}")
    if dist_init_required is not False:
        _start_torch_distributed(world, seconds or _zeal.default_timeout_s())
    if dist_backend is None:
        from .as_deepspeed import adopt_accelerate_cpu_state

        adopt_accelerate_cpu_state()


def _start_torch_distributed(world, timeout_s):
    """Note [torch.distributed beside Zeal's world]: Zeal's collectives run on its own MPI world;
    torch.distributed gets a gloo group over the same ranks in the same order, for libraries that
    use it directly. Rank 0 hosts a fresh store on a free port and tells the others the port over
    the MPI world, so it never collides with a launcher's store on MASTER_PORT."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
            raise _zeal.CommError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                                  f"{dist.get_world_size()}, but Zeal's world makes this rank {world.rank} of "
                                  f"{world.size}")
        return
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = torch.zeros(1, dtype=torch.int64)
    store = None
    if world.rank == 0:
        store = dist.TCPStore(host, 0, world.size, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        port[0] = store.port
    if world.size > 1:
        world.broadcast(port, 0).wait()
        if world.rank != 0:
            store = dist.TCPStore(host, int(port.item()), world.size, is_master=False,
                                  timeout=timedelta(seconds=timeout_s))
    dist.init_process_group("gloo", store=dist.PrefixStore("zeal-torch", store), rank=world.rank,
                            world_size=world.size, timeout=timedelta(seconds=timeout_s))


def is_initialized():
    """Whether init_distributed has run (torch.distributed is up beside Zeal's world). Zeal's own
    MPI world starts on first use either way."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_available():
    return True


def get_rank(group=None):
    return _group(group).rank


def get_world_size(group=None):
    return _group(group).size


def get_local_rank():
    """This rank's index on its node: LOCAL_RANK (the zeal launcher and torchrun set it), else Open
    MPI's OMPI_COMM_WORLD_LOCAL_RANK, else 0."""
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def get_world_group():
    return _zeal.world()


def new_group(ranks):
    """A communicator over `ranks` (global ranks); collective over the world, as torch's new_group."""
    ranks = list(ranks)
    return _zeal.world().split(ranks, "group:" + ",".join(map(str, ranks)))


def barrier(group=None, async_op=False, device_ids=None):
    return _done(_group(group).barrier(), async_op)


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    return _done(_group(group).all_reduce(tensor, _op(op)), async_op)


def inference_all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    return all_reduce(tensor, op, group, async_op)


def broadcast(tensor, src, group=None, async_op=False):
    """src is a global rank, as in torch.distributed."""
    g = _group(group)
    root = src if group is None else _group_rank(g, src)
    return _done(g.broadcast(tensor, root), async_op)


def _group_rank(group, global_rank):
    ranks = group_ranks(group)
    if global_rank not in ranks:
        raise _zeal.CommError(f"rank {global_rank} is not in group {group.name} (ranks {ranks})")
    return ranks.index(global_rank)


def group_ranks(group):
    """The global ranks of a group, in its order."""
    g = _group(group)
    mine = torch.tensor([_zeal.world().rank], dtype=torch.int64)
    out = torch.empty(g.size, dtype=torch.int64)
    g.all_gather(out, mine).wait()
    return out.tolist()


def get_all_ranks_from_group(group=None):
    return group_ranks(group)


def get_global_rank(group=None, group_rank=0):
    return group_ranks(group)[group_rank]


def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False):
    return _done(_group(group).all_gather(output_tensor, tensor), async_op)


allgather_fn = all_gather_into_tensor


def all_gather(tensor_list, tensor, group=None, async_op=False):
    g = _group(group)
    if len(tensor_list) != g.size:
        raise _zeal.CommError(f"all_gather: tensor_list has {len(tensor_list)} tensors for a group of {g.size}")
    flat = torch.empty((g.size * tensor.numel(),), dtype=tensor.dtype, device=tensor.device)
    g.all_gather(flat, tensor.reshape(-1)).wait()
    for i, out in enumerate(tensor_list):
        out.copy_(flat[i * tensor.numel():(i + 1) * tensor.numel()].view_as(out))
    return None


def reduce_scatter_tensor(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False):
    return _done(_group(group).reduce_scatter(output_tensor, tensor, _op(op)), async_op)


reduce_scatter_fn = reduce_scatter_tensor


def all_to_all_single(output, tensor, output_split_sizes=None, input_split_sizes=None, group=None,
                      async_op=False):
    """torch's all_to_all_single: chunk j of `tensor` (input_split_sizes[j] rows of dim 0, or equal
    chunks) goes to rank j of the group, whose chunk r of `output` receives it."""
    work = _group(group).all_to_all(output, tensor, list(output_split_sizes or []), list(input_split_sizes or []))
    return _done(work, async_op)


def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
    """torch's all_to_all over lists: input_tensor_list[j] goes to rank j, output_tensor_list[r]
    comes from rank r (one uneven exchange of the flattened tensors)."""
    g = _group(group)
    if len(input_tensor_list) != g.size or len(output_tensor_list) != g.size:
        raise _zeal.CommError(f"all_to_all: {len(input_tensor_list)} inputs and {len(output_tensor_list)} outputs "
                              f"for a group of {g.size}")
    flat_in = torch.cat([t.reshape(-1) for t in input_tensor_list])
    flat_out = torch.empty(sum(t.numel() for t in output_tensor_list), dtype=flat_in.dtype, device=flat_in.device)
    g.all_to_all(flat_out, flat_in, [t.numel() for t in output_tensor_list],
                 [t.numel() for t in input_tensor_list]).wait()
    offset = 0
    for out in output_tensor_list:
        out.copy_(flat_out[offset:offset + out.numel()].view_as(out))
        offset += out.numel()
    return None


def reduce(tensor, dst, op=ReduceOp.SUM, group=None, async_op=False):
    """Every rank ends with the reduction (an all-reduce); dst's value is the one DeepSpeed defines."""
    return all_reduce(tensor, op, group, async_op)


def send(tensor, dst, group=None, tag=0):
    _group(group).send(tensor, dst, tag).wait()


def recv(tensor, src=None, group=None, tag=0):
    if src is None:
        raise _zeal.CommError("recv: Zeal's point-to-point receive needs src (no receive from any rank)")
    _group(group).recv(tensor, src, tag).wait()
    return src


def isend(tensor, dst, group=None, tag=0):
    return _group(group).send(tensor, dst, tag)


def irecv(tensor, src=None, group=None, tag=0):
    if src is None:
        raise _zeal.CommError("irecv: Zeal's point-to-point receive needs src")
    return _group(group).recv(tensor, src, tag)


def log_summary(show_straggler=False, return_dict=False):
    """DeepSpeed's comms summary: Zeal counts per engine (engine.comms_log_summary())."""
    return {} if return_dict else None


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
    """A barrier; Zeal's every collective is monitored (a rank that does not arrive is named)."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else (timeout or 0.0)
    _group(group).barrier(float(seconds)).wait()


def destroy_process_group(group=None):
    """Ends the torch.distributed group init_distributed started; Zeal finalises MPI when the
    process exits."""
    import torch.distributed as dist

    if group is None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
