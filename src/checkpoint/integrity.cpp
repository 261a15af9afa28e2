#include "zeal/checkpoint/integrity.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>

#include "zeal/core/error.h"
#include "zeal/core/json.h"

namespace zeal::checkpoint {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string read_regular_file(const std::string& path, size_t max_bytes, const std::string& what) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw CheckpointError("no " + what + " at " + path);
    throw CheckpointError("cannot open " + what + " " + path + ": " + std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    const char* kind = S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "not a regular file";
    throw CheckpointError(what + " " + path + " is " + kind + "; a checkpoint holds regular files only");
  }
  if (static_cast<size_t>(st.st_size) > max_bytes) {
    ::close(fd);
    throw CheckpointError(what + " " + path + " has " + std::to_string(st.st_size) + " bytes, more than the " +
                          std::to_string(max_bytes) + " such a file can hold (not a Zeal checkpoint file?)");
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    ssize_t r = ::read(fd, text.data() + done, text.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    done += static_cast<size_t>(r);
  }
  ::close(fd);
  if (done != text.size()) throw CheckpointError("cannot read " + what + " " + path + " whole (changed while read?)");
  return text;
}

json parse_checkpoint_json(std::string_view text, const std::string& path) {
  json doc;
  JsonProblem problem;
  if (!parse_json(text, doc, problem))
    throw CheckpointError(path + " is not valid JSON " + problem.describe() + " (corrupted?)");
  return doc;
}

std::string digest_hex(std::string_view bytes) {
  char out[17];
  std::snprintf(out, sizeof(out), "%016llx", static_cast<unsigned long long>(XXH64(bytes.data(), bytes.size(), 0)));
  return out;
}

std::string new_save_id() {
  std::random_device device;
  std::string id;
  for (int i = 0; i < 4; ++i) {
    char part[9];
    std::snprintf(part, sizeof(part), "%08x", static_cast<unsigned>(device()));
    id += part;
  }
  return id;
}

std::string seal_json(json doc) {
  doc.erase("checksum");
  doc["checksum"] = "xxh64:" + digest_hex(doc.dump());
  return doc.dump(1);
}

json read_sealed_json(const std::string& path, bool* sealed) {
  json doc = parse_checkpoint_json(read_regular_file(path, 256u << 20, "checkpoint manifest"), path);
  if (!doc.is_object()) throw CheckpointError("checkpoint manifest " + path + " is not a JSON object (corrupted?)");
  auto it = doc.find("checksum");
  if (sealed) *sealed = it != doc.end();
  if (it == doc.end()) return doc;
  if (!it->is_string()) throw CheckpointError("checkpoint manifest " + path + ": its checksum is not a string");
  std::string recorded = it->get<std::string>();
  doc.erase(it);
  std::string actual = "xxh64:" + digest_hex(doc.dump());
  if (recorded != actual)
    throw CheckpointError("checkpoint manifest " + path + " fails its checksum (recorded " + recorded + ", content " +
                          actual + "): the file was edited or damaged after the save");
  return doc;
}

namespace {

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return false;
    i += n;
  }
  return true;
}

}  // namespace

std::string read_latest(const std::string& save_dir) {
  const std::string path = (fs::path(save_dir) / "latest").string();
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw CheckpointError("no 'latest' file in " + save_dir + ": no complete checkpoint was saved there; pass a tag");
  std::string name = read_regular_file(path, 4096, "checkpoint pointer");
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
  if (name.empty()) throw CheckpointError(path + " is empty");
  bool plain = name[0] != '.';
  for (unsigned char c : name) plain = plain && c >= 0x20 && c != 0x7f && c != '/' && c != '\\';
  if (!plain || !valid_utf8(name))
    throw CheckpointError(path + " does not name a checkpoint tag (it must hold one plain directory name, "
                          "UTF-8 text without '/' or control characters; corrupted?)");
  return name;
}

}  // namespace zeal::checkpoint
