// The MPI (Open MPI) backend for host tensors. See the block comment at the top of
// src/comm/mpi_backend.cpp for its threading model.
#pragma once

#include "zeal/comm/communicator.h"
#include "zeal/comm/world.h"

namespace zeal::comm {

// The world communicator over MPI_COMM_WORLD (initializing MPI on first use).
CommunicatorPtr mpi_world(Timeout default_timeout);
// The world of ranks not started by mpirun (torchrun): see Note [Rendezvous] in rendezvous.cpp.
CommunicatorPtr mpi_world_rendezvous(const RankInfo& info, Timeout default_timeout);
void mpi_shutdown();

// Test hook (Note [Injected collective faults] in mpi_backend.cpp): this process silently drops
// one collective, the first on a group whose name starts with group_prefix (of more than one
// rank) after `after` others on such groups.
void inject_dropped_collective(const std::string& group_prefix, int64_t after);

// Turns the signature comparison off (the announcements still go out): for benchmarks that measure
// what the check costs, never for training (Note [Collective signatures]).
void set_signature_checks(bool on);

// Turns caller-run collectives off (every op goes through the progress thread): for benchmarks that
// measure the hand-off (Note [Caller-run collectives]).
void set_caller_runs(bool on);

}  // namespace zeal::comm
