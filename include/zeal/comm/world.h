// How a process finds its place in the job and gets its world communicator.
//
// Ranks started by `zeal --num_procs N` or by `mpirun` form one MPI world (the zeal launcher
// starts local ranks through mpirun). Ranks started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT) are joined into one by a rendezvous (src/comm/rendezvous.cpp). A process with
// none of the launch variables is a world of size 1. See docs/architecture.md.
#pragma once

#include <memory>
#include <string>

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

// The process-wide world communicator, created on first call (later calls return the same one;
// a different default_timeout on a later call changes nothing). Throws CommError when the
// launch variables describe a world this build cannot join, TimeoutError when ranks of it
// never arrive.
CommunicatorPtr world(Timeout default_timeout);

// Ends the process's collectives: stops the progress thread and finalizes MPI unless a
// communicator broke (then finalize could block on the op that never completed).
void shutdown();

// The MPI library's own version line (MPI_Get_library_version; callable before MPI_Init), or
// "not built" without MPI. The NCCL version the process loaded ("2.30.7"), or "not built".
std::string mpi_library_version();
std::string nccl_version();

}  // namespace zeal::comm
