// How a process finds its place in the job and gets its world communicator.
//
// Ranks started by `zeal --num_procs N` or by `mpirun` form one MPI world (the zeal launcher
// starts local ranks through mpirun). Ranks started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT) are joined into one by a rendezvous (src/comm/rendezvous.cpp). A process with
// none of the launch variables is a world of size 1. See docs/architecture.md.
#pragma once

#include <memory>
#include <string>

#include <c10/core/Device.h>

#include "zeal/comm/communicator.h"

namespace zeal::comm {

struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = 1;
  bool under_mpi = false;  // OMPI_COMM_WORLD_* present
};

// Reads OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}, else RANK/WORLD_SIZE/LOCAL_RANK.
RankInfo detect_rank_info();

// Note [One comms timeout]: every MPI communicator of the process (the world and every group
// split from it, whenever cut) bounds an op that names no timeout of its own by this process-wide
// default, read when the op starts. It begins at kDefaultCommsTimeoutS (zeal/core/config.h); the
// engine, zeal.zero.Init and the pipeline set it from the config's comms_timeout_s, so groups
// cut before the config was read follow it too.
Timeout default_timeout();
void set_default_timeout(Timeout timeout);  // > 0

// The process-wide world communicator, created on first call (later calls return the same one).
// A non-zero timeout sets the process default first. Throws CommError when the launch variables
// describe a world this build cannot join, TimeoutError when ranks of it never arrive.
CommunicatorPtr world(Timeout default_timeout = Timeout{0});

// The communicator for tensors on `device` over the ranks of `host` (Note [Backend by device]):
// `host` itself for CPU tensors (MPI), an NCCL communicator over the same ranks for a CUDA device
// (collective over `host`). Throws CommError for a CUDA device in a build without CUDA.
CommunicatorPtr for_device(const CommunicatorPtr& host, const c10::Device& device);

// Ends the process's collectives: stops the progress thread and finalizes MPI unless a
// communicator broke (then finalize could block on the op that never completed).
void shutdown();

// The MPI library's own version line (MPI_Get_library_version; callable before MPI_Init), or
// "not built" without MPI. The NCCL version the process loaded ("2.30.7"), or "not built".
std::string mpi_library_version();
std::string nccl_version();

}  // namespace zeal::comm
