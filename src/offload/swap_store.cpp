#include "zeal/offload/swap_store.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "zeal/core/error.h"
#include "zeal/core/logging.h"

namespace zeal::offload {
namespace fs = std::filesystem;
namespace {

std::string host_name() {
  char name[256] = {0};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "host";
  for (char* c = name; *c; ++c)
    if (*c == '/' || *c == '-') *c = '_';
  return name;
}

// Directories of this host's stores whose process has ended (Note [Swap file lifetime]).
void remove_stale(const std::string& nvme_path, const std::string& prefix) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(nvme_path, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
    if (pid <= 0 || pid == ::getpid() || ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    std::error_code remove_ec;
    fs::remove_all(entry.path(), remove_ec);
    if (!remove_ec)
      log("offload", LogLevel::kWarn, "removed ", entry.path().string(), ", left by process ", pid,
          " which has ended");
  }
}

// Every live store, so that a normal exit removes their files even when the engine that owns them
// is never destroyed (Python may leave objects alive at interpreter exit).
// Never destroyed: the atexit handler runs after static destructors of objects made later.
std::mutex& registry_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::vector<SwapStore*>& registry() {
  static auto* stores = new std::vector<SwapStore*>;
  return *stores;
}
void remove_at_exit() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  for (SwapStore* s : registry()) s->remove_files();
}

}  // namespace

SwapStore::SwapStore(const std::string& nvme_path, const std::string& purpose, const AioConfig& aio)
    : purpose_(purpose), aio_(aio) {
  struct stat st {};
  if (::stat(nvme_path.c_str(), &st) != 0)
    throw IoError("nvme_path '" + nvme_path + "' for " + purpose + " swap: " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) throw IoError("nvme_path '" + nvme_path + "' for " + purpose + " swap is not a directory");
  const std::string prefix = "zeal-swap-" + host_name() + "-";
  remove_stale(nvme_path, prefix);
  static std::atomic<int> counter{0};
  dir_ = (fs::path(nvme_path) / (prefix + std::to_string(::getpid()) + "-" + std::to_string(counter++))).string();
  if (::mkdir(dir_.c_str(), 0700) != 0)
    throw IoError("cannot create the " + purpose + " swap directory " + dir_ + ": " + std::strerror(errno) +
                  " (is nvme_path writable?)");
  static std::once_flag at_exit;
  std::call_once(at_exit, [] { std::atexit(remove_at_exit); });
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().push_back(this);
}

SwapStore::~SwapStore() {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto& stores = registry();
    stores.erase(std::remove(stores.begin(), stores.end(), this), stores.end());
  }
  remove_files();
}

void SwapStore::remove_files() {
  for (File& f : files_) {
    if (f.fd < 0) continue;
    ::close(f.fd);
    f.fd = -1;
    ::unlink(f.path.c_str());
  }
  if (!dir_.empty()) ::rmdir(dir_.c_str());
}

void SwapStore::check_free_space(int64_t bytes) const {
  struct statvfs vfs {};
  if (::statvfs(dir_.c_str(), &vfs) != 0) throw IoError("statvfs " + dir_ + ": " + std::strerror(errno));
  const int64_t free_bytes = static_cast<int64_t>(vfs.f_bavail) * static_cast<int64_t>(vfs.f_frsize);
  if (free_bytes < bytes)
    throw IoError("the " + purpose_ + " swap files need " + format_bytes(bytes) + " under " + dir_ + " but its file system has " +
                  format_bytes(free_bytes) + " free");
}

int64_t SwapStore::add_file(const std::string& name, int64_t bytes) {
  ZEAL_INTERNAL_ASSERT(bytes % kIoAlignment == 0, "swap file size ", bytes, " is not aligned");
  File f;
  f.path = (fs::path(dir_) / name).string();
  f.bytes = bytes;
  f.fd = ::open(f.path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_DIRECT | O_CLOEXEC, 0600);
  if (f.fd < 0) throw IoError("cannot create swap file " + f.path + ": " + std::strerror(errno));
  int rc = bytes > 0 ? ::posix_fallocate(f.fd, 0, bytes) : 0;
  if (rc != 0) {
    ::close(f.fd);
    ::unlink(f.path.c_str());
    throw IoError("cannot reserve " + format_bytes(bytes) + " for swap file " + f.path + ": " + std::strerror(rc));
  }
  files_.push_back(std::move(f));
  return static_cast<int64_t>(files_.size()) - 1;
}

IoHandle SwapStore::write(int64_t file, const void* buffer) {
  return write(file, buffer, files_[static_cast<size_t>(file)].bytes, 0);
}

IoHandle SwapStore::read(int64_t file, void* buffer) {
  return read(file, buffer, files_[static_cast<size_t>(file)].bytes, 0);
}

void SwapStore::finish_write(int64_t file, const IoHandle& handle) { finish_write(file, 0, handle); }

void SwapStore::finish_read(int64_t file, const IoHandle& handle) { finish_read(file, 0, handle); }

IoHandle SwapStore::write(int64_t file, const void* buffer, int64_t bytes, int64_t offset) {
  File& f = files_[static_cast<size_t>(file)];
  ZEAL_INTERNAL_ASSERT(offset >= 0 && offset + bytes <= f.bytes, "write past the end of swap file ", f.path);
  f.checksums.erase(offset);  // a failed write leaves the region unreadable rather than wrongly trusted
  return aio_.write(f.fd, f.path, buffer, bytes, offset);
}

IoHandle SwapStore::read(int64_t file, void* buffer, int64_t bytes, int64_t offset) {
  File& f = files_[static_cast<size_t>(file)];
  ZEAL_INTERNAL_ASSERT(f.checksums.count(offset), "region at ", offset, " of swap file ", f.path,
                       " read before it was written");
  return aio_.read(f.fd, f.path, buffer, bytes, offset);
}

void SwapStore::finish_write(int64_t file, int64_t offset, const IoHandle& handle) {
  handle->wait();
  files_[static_cast<size_t>(file)].checksums[offset] = handle->checksums();
}

void SwapStore::finish_read(int64_t file, int64_t offset, const IoHandle& handle) {
  File& f = files_[static_cast<size_t>(file)];
  handle->wait();
  if (handle->checksums() != f.checksums[offset])
    throw IoError("read of swap file " + f.path + (offset ? " at offset " + std::to_string(offset) : std::string()) +
                  ": the " + purpose_ +
                  " read back differs from what Zeal wrote (checksum mismatch): the file was changed underneath");
}

int64_t SwapStore::total_bytes() const {
  int64_t total = 0;
  for (const File& f : files_) total += f.bytes;
  return total;
}

}  // namespace zeal::offload
