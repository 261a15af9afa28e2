// Note [Rendezvous]
// An MPI world normally comes from mpirun. Processes started some other way (torchrun) are MPI
// singletons, and Open MPI can join singletons only through a common ompi-server. So:
//  a. The ranks meet at the key-value store at MASTER_ADDR:MASTER_PORT: torchrun's own store when
//     torchrun says it may be shared (TORCHELASTIC_USE_AGENT_STORE=True), else one that rank 0
//     hosts. Keys are prefixed with the torchrun run id and restart count.
//  b. Rank 0 starts `ompi-server` (it dies with rank 0) and publishes its URI; every rank points
//     OMPI_MCA_pmix_server_uri at it before MPI_Init.
//  c. After MPI_Init each rank checks in; rank 0 waits for all of them (up to the timeout, naming
//     the ranks that never checked in), opens an MPI port and publishes it.
//  d. The ranks are joined in RANK order: for k = 1..n-1 the ranks already joined accept on the
//     port while rank k (and only rank k: it waits for its turn key) connects; the intercomm is
//     merged with the newcomer last, so ranks in the result equal RANK.
// When MASTER_ADDR is a loopback address, ompi-server and MPI are kept on the loopback interface.
#include "rendezvous.h"

#define OMPI_SKIP_MPICXX 1
#include <mpi.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "zeal/core/checks.h"
#include "zeal/core/error.h"

namespace zeal::comm {
namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value && *value ? value : fallback;
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }
std::string text(const std::vector<uint8_t>& b) { return {b.begin(), b.end()}; }

// Replaces `group` by its union with the other side of `inter`; the newcomer's side goes last.
void merge_into(MPI_Comm& group, MPI_Comm inter, bool newcomer) {
  MPI_Comm merged;
  MPI_CHECK(MPI_Intercomm_merge(inter, newcomer ? 1 : 0, &merged));
  MPI_Comm_free(&inter);
  MPI_Comm_free(&group);
  group = merged;
}

}  // namespace

Rendezvous::Rendezvous(const RankInfo& info, Timeout timeout) : info_(info), timeout_(timeout) {
  const std::string host = env_or("MASTER_ADDR", "127.0.0.1");
  const int port = std::stoi(env_or("MASTER_PORT", "29500"));
  prefix_ = "zeal/" + env_or("TORCHELASTIC_RUN_ID", "run") + "/" + env_or("TORCHELASTIC_RESTART_COUNT", "0") + "/";
  c10d::TCPStoreOptions options;
  options.port = static_cast<uint16_t>(port);
  options.isServer = info.rank == 0 && env_or("TORCHELASTIC_USE_AGENT_STORE", "") != "True";
  options.numWorkers = std::nullopt;
  options.waitWorkers = false;
  options.timeout = timeout;
  try {
    store_ = std::make_shared<c10d::TCPStore>(host, options);
  } catch (const std::exception& e) {
    throw CommError("rendezvous: cannot reach the store at " + host + ":" + std::to_string(port) + " (rank " +
                    std::to_string(info.rank) + "): " + e.what());
  }
  const bool loopback = is_loopback(host);
  if (info.rank == 0) {
    char dir_template[] = "/tmp/zeal-ompi-server-XXXXXX";
    ZEAL_CHECK_AS(CommError, mkdtemp(dir_template) != nullptr, "rendezvous: cannot create a temporary folder");
    server_dir_ = dir_template;
    std::string report = server_dir_ + "/uri";
    server_pid_ = fork();
    ZEAL_CHECK_AS(CommError, server_pid_ >= 0, "rendezvous: cannot fork ompi-server");
    if (server_pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);  // the server ends with rank 0
      std::vector<const char*> argv = {"ompi-server", "--no-daemonize", "--report-uri", report.c_str()};
      if (loopback) argv.insert(argv.end(), {"--mca", "oob_tcp_if_include", "lo"});
      argv.push_back(nullptr);
      execvp("ompi-server", const_cast<char* const*>(argv.data()));
      _exit(127);
    }
    std::string uri;
    for (auto deadline = std::chrono::steady_clock::now() + timeout; uri.empty();) {
      std::ifstream in(report);
      std::getline(in, uri);
      if (!uri.empty()) break;
      int status = 0;
      if (waitpid(server_pid_, &status, WNOHANG) == server_pid_)
        throw CommError("rendezvous: ompi-server exited before reporting its address (is openmpi-bin installed?)");
      ZEAL_CHECK_AS(TimeoutError, std::chrono::steady_clock::now() < deadline,
                    "rendezvous: ompi-server did not report its address in time");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    store_->set(key("ompi_uri"), bytes(uri));
  }
  std::string uri = text(store_->get(key("ompi_uri"))) + "\n";
  char file_template[] = "/tmp/zeal-ompi-uri-XXXXXX";
  int fd = mkstemp(file_template);
  ZEAL_CHECK_AS(CommError, fd >= 0, "rendezvous: cannot write the ompi-server address");
  ZEAL_CHECK_AS(CommError, write(fd, uri.data(), uri.size()) == static_cast<ssize_t>(uri.size()),
                "rendezvous: cannot write the ompi-server address");
  close(fd);
  uri_file_ = file_template;
  setenv("OMPI_MCA_pmix_server_uri", ("file:" + uri_file_).c_str(), 1);
  if (loopback) {
    setenv("OMPI_MCA_oob_tcp_if_include", "lo", 0);
    setenv("OMPI_MCA_btl_tcp_if_include", "lo", 0);
  }
}

Rendezvous::~Rendezvous() {
  if (!uri_file_.empty()) unlink(uri_file_.c_str());
  if (server_pid_ > 0) {
    kill(server_pid_, SIGTERM);
    waitpid(server_pid_, nullptr, 0);
  }
  if (!server_dir_.empty()) {
    unlink((server_dir_ + "/uri").c_str());
    rmdir(server_dir_.c_str());
  }
}

std::string Rendezvous::key(const std::string& name) const { return prefix_ + name; }

void Rendezvous::wait_for_ranks(const std::string& what) {
  std::vector<std::string> keys;
  for (int r = 0; r < info_.world_size; ++r) keys.push_back(key(what + "/" + std::to_string(r)));
  try {
    store_->wait(keys, timeout_);
  } catch (const std::exception&) {
    std::string missing;
    for (int r = 0; r < info_.world_size; ++r)
      if (!store_->check({keys[r]})) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    throw TimeoutError("rendezvous: ranks that did not arrive within " + std::to_string(timeout_.count() / 1000) +
                       " s: [" + missing + "] of a world of " + std::to_string(info_.world_size));
  }
}

void* Rendezvous::form_world() {
  store_->set(key("ready/" + std::to_string(info_.rank)), bytes("1"));
  wait_for_ranks("ready");
  char port[MPI_MAX_PORT_NAME] = {0};
  MPI_Comm group;
  MPI_CHECK(MPI_Comm_dup(MPI_COMM_SELF, &group));
  if (info_.rank == 0) {
    MPI_CHECK(MPI_Open_port(MPI_INFO_NULL, port));
    store_->set(key("port"), bytes(port));
  } else {
    std::string published = text(store_->get(key("port")));
    published.copy(port, sizeof(port) - 1);
    store_->get(key("turn/" + std::to_string(info_.rank)));  // wait for this rank's turn
    MPI_Comm inter;
    MPI_CHECK(MPI_Comm_connect(port, MPI_INFO_NULL, 0, group, &inter));
    merge_into(group, inter, /*newcomer=*/true);
  }
  for (int k = info_.rank + 1; k < info_.world_size; ++k) {
    if (info_.rank == 0) store_->set(key("turn/" + std::to_string(k)), bytes("go"));
    MPI_Comm inter;
    MPI_CHECK(MPI_Comm_accept(port, MPI_INFO_NULL, 0, group, &inter));
    merge_into(group, inter, /*newcomer=*/false);
  }
  if (info_.rank == 0) MPI_Close_port(port);
  int rank = -1, size = 0;
  MPI_Comm_rank(group, &rank);
  MPI_Comm_size(group, &size);
  ZEAL_INTERNAL_ASSERT(rank == info_.rank && size == info_.world_size, "rendezvous formed rank ", rank, " of ", size,
                       ", expected ", info_.rank, " of ", info_.world_size);
  return reinterpret_cast<void*>(static_cast<intptr_t>(MPI_Comm_c2f(group)));
}

}  // namespace zeal::comm
