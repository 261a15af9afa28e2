#include "zeal/comm/world.h"

#include "zeal/core/config.h"

#include <cstdlib>
#include <atomic>
#include <mutex>
#include <string>

#include "zeal/comm/mpi_backend.h"
#include "zeal/comm/nccl_backend.h"
#include "zeal/features.h"
#if ZEAL_WITH_MPI
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#if ZEAL_WITH_CUDA
#include <nccl.h>
#endif
#include "zeal/core/error.h"

namespace zeal::comm {
namespace {

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (!value || !*value) return fallback;
  try {
    return std::stoi(value);
  } catch (const std::exception&) {
    throw CommError(std::string("environment variable ") + name + "='" + value + "' is not an integer");
  }
}

struct WorldHolder {
  std::mutex mutex;
  CommunicatorPtr world;
};

WorldHolder& holder() {
  static WorldHolder h;
  return h;
}

}  // namespace

RankInfo detect_rank_info() {
  RankInfo info;
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) {
    info.under_mpi = true;
    info.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    info.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    info.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    info.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else {
    info.rank = env_int("RANK", 0);
    info.world_size = env_int("WORLD_SIZE", 1);
    info.local_rank = env_int("LOCAL_RANK", 0);
    info.local_size = env_int("LOCAL_WORLD_SIZE", info.world_size);
  }
  return info;
}

namespace {
std::atomic<int64_t>& default_timeout_ms() {
  static std::atomic<int64_t> ms{static_cast<int64_t>(kDefaultCommsTimeoutS * 1000.0)};
  return ms;
}
}  // namespace

Timeout default_timeout() { return Timeout(default_timeout_ms().load()); }

void set_default_timeout(Timeout timeout) {
  ZEAL_CHECK_AS(ConfigError, timeout.count() > 0, "comms_timeout_s must be > 0");
  default_timeout_ms().store(timeout.count());
}

CommunicatorPtr world(Timeout timeout) {
  if (timeout.count() > 0) set_default_timeout(timeout);
  WorldHolder& h = holder();
  std::lock_guard<std::mutex> lock(h.mutex);
  if (h.world) return h.world;
  RankInfo info = detect_rank_info();
#if ZEAL_WITH_MPI
  // Timeout{0}: the communicators follow the process default (Note [One comms timeout]).
  h.world = (!info.under_mpi && info.world_size > 1) ? mpi_world_rendezvous(info, Timeout{0}) : mpi_world(Timeout{0});
#else
  throw CommError("this Zeal build has no MPI backend (ZEAL_WITH_MPI=OFF)");
#endif
  return h.world;
}

void shutdown() {
  WorldHolder& h = holder();
  std::lock_guard<std::mutex> lock(h.mutex);
  h.world.reset();
#if ZEAL_WITH_MPI
  mpi_shutdown();
#endif
}

}  // namespace zeal::comm

namespace zeal::comm {

std::string mpi_library_version() {
#if ZEAL_WITH_MPI
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(text, &length);
  std::string version(text, static_cast<size_t>(length));
  while (!version.empty() && (version.back() == '\n' || version.back() == '\0')) version.pop_back();
  return version;
#else
  return "not built";
#endif
}

std::string nccl_version() {
#if ZEAL_WITH_CUDA
  int code = 0;
  if (ncclGetVersion(&code) != ncclSuccess) return "unknown (ncclGetVersion failed)";
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
#else
  return "not built";
#endif
}

// Note [Backend by device]: host tensors travel over MPI, device tensors over NCCL; the choice is
// made here, once, for the engine, the bindings and the process groups alike.
CommunicatorPtr for_device(const CommunicatorPtr& host, const c10::Device& device) {
  ZEAL_CHECK_AS(CommError, host, "for_device needs a host communicator");
  if (!device.is_cuda()) return host;
#if ZEAL_WITH_CUDA
  return nccl_world(host, device.has_index() ? device.index() : 0, default_timeout());
#else
  throw CommError("tensors on " + device.str() + " need the nccl backend, and this Zeal was built without CUDA");
#endif
}

}  // namespace zeal::comm
