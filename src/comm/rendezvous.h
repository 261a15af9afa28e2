// Rendezvous for ranks that were not started by mpirun (torchrun, or RANK/WORLD_SIZE/MASTER_ADDR/
// MASTER_PORT set by hand). See Note [Rendezvous] in rendezvous.cpp.
#pragma once

#include <memory>
#include <string>

#include "zeal/comm/communicator.h"
#include "zeal/comm/world.h"

namespace c10d {
class Store;
}

namespace zeal::comm {

class Rendezvous {
 public:
  // Connects to (or, on rank 0 outside torchrun, hosts) the key-value store at
  // MASTER_ADDR:MASTER_PORT, starts ompi-server on rank 0 and points this process's MPI at it.
  // Must run before MPI_Init.
  Rendezvous(const RankInfo& info, Timeout timeout);
  ~Rendezvous();

  // Once MPI is initialized (a singleton per process): every rank checks in, and the ranks are
  // joined one by one with MPI_Comm_accept/connect into one intracommunicator ordered by RANK.
  // Runs on the thread that makes MPI calls. Returns the MPI_Comm handle as an opaque integer.
  void* form_world();

 private:
  std::string key(const std::string& name) const;
  void wait_for_ranks(const std::string& what);

  RankInfo info_;
  Timeout timeout_;
  std::string prefix_;
  std::shared_ptr<c10d::Store> store_;
  int server_pid_ = -1;
  std::string uri_file_;
  std::string server_dir_;
};

}  // namespace zeal::comm
