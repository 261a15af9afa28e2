#include "zeal/checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include "zeal/checkpoint/integrity.h"
#include "zeal/core/error.h"
#include "zeal/core/json.h"

namespace zeal::checkpoint {
namespace {

using json = nlohmann::json;

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeInfo kDtypes[] = {
    {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16}, {"F64", at::kDouble},
    {"I64", at::kLong},  {"I32", at::kInt},   {"I16", at::kShort},     {"I8", at::kChar},
    {"U8", at::kByte},   {"BOOL", at::kBool},
};

std::string errno_text() { return std::strerror(errno); }

void write_all(int fd, const char* data, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, data, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw IoError("writing " + path + ": " + errno_text());
    data += w;
    n -= static_cast<size_t>(w);
  }
}

uint32_t crc_of(const at::Tensor& t) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(t.data_ptr());
  int64_t left = static_cast<int64_t>(t.nbytes());
  while (left > 0) {  // zlib takes 32-bit lengths
    uInt chunk = static_cast<uInt>(std::min<int64_t>(left, 1 << 30));
    crc = crc32(crc, p, chunk);
    p += chunk;
    left -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

}  // namespace

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorEntry::element_size() const { return static_cast<int64_t>(c10::elementSize(scalar_type_of(dtype))); }

const char* safetensors_dtype(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.name;
  throw CheckpointError(std::string("dtype ") + c10::toString(t) + " cannot be stored in a checkpoint");
}

at::ScalarType scalar_type_of(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw CheckpointError("unknown safetensors dtype '" + name + "'");
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata,
                       const std::function<void(const std::string&)>& progress) {
  json header = json::object();
  json meta = json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  std::vector<at::Tensor> host;
  int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.detach().contiguous().cpu();
    int64_t bytes = static_cast<int64_t>(t.nbytes());
    header[name] = {{"dtype", safetensors_dtype(t.scalar_type())}, {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    meta["crc32:" + name] = std::to_string(offset) + ":" + std::to_string(offset + bytes) + ":" + std::to_string(crc_of(t));
    offset += bytes;
    host.push_back(std::move(t));
  }
  meta["data_bytes"] = std::to_string(offset);
  header["__metadata__"] = meta;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // align the data section
  uint64_t length = text.size();
  unsigned char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<unsigned char>((length >> (8 * i)) & 0xff);

  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw IoError("cannot create " + path + ": " + errno_text());
  try {
    write_all(fd, reinterpret_cast<const char*>(prefix), 8, path);
    write_all(fd, text.data(), text.size(), path);
    int64_t written = 0;
    bool half_reported = false;
    for (const at::Tensor& t : host) {
      const char* data = static_cast<const char*>(t.data_ptr());
      int64_t n = static_cast<int64_t>(t.nbytes());
      // Write in two pieces so the "half" point falls inside the data, as a crash might.
      int64_t first = n / 2;
      write_all(fd, data, static_cast<size_t>(first), path);
      written += first;
      if (progress && !half_reported && written * 2 >= offset) {
        half_reported = true;
        progress("half");
      }
      write_all(fd, data + first, static_cast<size_t>(n - first), path);
      written += n - first;
    }
    if (progress && !half_reported) progress("half");
    if (::fsync(fd) != 0) throw IoError("fsync " + path + ": " + errno_text());
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) throw IoError("closing " + path + ": " + errno_text());
}

SafetensorsReader::SafetensorsReader(std::string path) : path_(std::move(path)) {
  // O_NONBLOCK: a FIFO in a shard's place must not block the load (regular files ignore it).
  fd_ = ::open(path_.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd_ < 0) throw CheckpointError("cannot open " + path_ + ": " + errno_text());
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    fd_ = -1;
    throw CheckpointError(path_ + " is not a regular file (" + (S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a special file") +
                          "); a checkpoint holds regular files only");
  }
  const int64_t file_size = st.st_size;
  file_size_ = file_size;
  auto bad = [&](const std::string& what) {
    ::close(fd_);
    fd_ = -1;
    throw CheckpointError(path_ + " is not a valid checkpoint shard: " + what);
  };
  unsigned char prefix[8];
  if (file_size < 8 || ::pread(fd_, prefix, 8, 0) != 8) bad("shorter than its 8-byte header length");
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<uint64_t>(prefix[i]) << (8 * i);
  if (length > static_cast<uint64_t>(file_size - 8) || length > (100u << 20))
    bad("header length " + std::to_string(length) + " does not fit a file of " + std::to_string(file_size) +
        " bytes (truncated?)");
  std::string text(length, '\0');
  if (::pread(fd_, text.data(), length, 8) != static_cast<ssize_t>(length)) bad("cannot read the header");
  header_digest_ = digest_hex(text);
  json header;
  JsonProblem problem;
  if (!parse_json(text, header, problem)) bad("its header is not valid JSON " + problem.describe() + " (corrupted?)");
  if (!header.is_object()) bad("the header is not a JSON object (corrupted?)");
  data_start_ = 8 + static_cast<int64_t>(length);
  const int64_t data_size = file_size - data_start_;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) bad("__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m)
        if (m.value().is_string()) metadata_[m.key()] = m.value().get<std::string>();
      continue;
    }
    const json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      bad("entry '" + it.key() + "' lacks dtype, shape or data_offsets");
    TensorEntry entry;
    try {
      entry.dtype = e["dtype"].get<std::string>();
      entry.shape = e["shape"].get<std::vector<int64_t>>();
      auto offsets = e["data_offsets"].get<std::vector<int64_t>>();
      if (offsets.size() != 2) bad("entry '" + it.key() + "' has " + std::to_string(offsets.size()) + " data offsets");
      entry.begin = offsets[0];
      entry.end = offsets[1];
      scalar_type_of(entry.dtype);
    } catch (const nlohmann::json::exception& err) {
      bad("entry '" + it.key() + "': " + err.what());
    } catch (const CheckpointError& err) {
      bad(err.what());
    }
    if (entry.begin < 0 || entry.end < entry.begin || entry.end - entry.begin != entry.numel() * entry.element_size())
      bad("entry '" + it.key() + "' has inconsistent offsets for its shape and dtype");
    if (entry.end > data_size)
      bad("entry '" + it.key() + "' ends at byte " + std::to_string(entry.end) + " of a data section of " +
          std::to_string(data_size) + " bytes (truncated)");
    entries_[it.key()] = entry;
  }
  auto recorded = metadata_.find("data_bytes");
  if (recorded != metadata_.end() && recorded->second != std::to_string(data_size))
    bad("its data section has " + std::to_string(data_size) + " bytes but the header records " + recorded->second +
        " (truncated, or bytes appended?)");
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorEntry& SafetensorsReader::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw CheckpointError(path_ + " has no tensor '" + name + "'");
  return it->second;
}

void SafetensorsReader::read(const std::string& name, int64_t begin, int64_t end, at::Tensor& out) const {
  const TensorEntry& e = entry(name);
  // The range and dtype come from a checkpoint's tables, so a mismatch is the file's fault.
  if (!(begin >= 0 && end >= begin && end <= e.numel()))
    throw CheckpointError(path_ + ": elements [" + std::to_string(begin) + ", " + std::to_string(end) + ") of '" + name +
                          "' are asked for, but it has " + std::to_string(e.numel()) +
                          " (the manifest does not match this shard)");
  if (out.scalar_type() != scalar_type_of(e.dtype))
    throw CheckpointError(path_ + ": tensor '" + name + "' is " + e.dtype + ", expected " +
                          safetensors_dtype(out.scalar_type()));
  ZEAL_INTERNAL_ASSERT(out.is_contiguous() && out.device().is_cpu() && out.numel() == end - begin,
                       "read target does not match ", name);
  const int64_t es = e.element_size();
  char* dst = static_cast<char*>(out.data_ptr());
  int64_t left = (end - begin) * es, pos = data_start_ + e.begin + begin * es;
  while (left > 0) {
    ssize_t r = ::pread(fd_, dst, static_cast<size_t>(left), pos);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw CheckpointError("reading '" + name + "' from " + path_ + ": " + (r < 0 ? errno_text() : "unexpected end of file"));
    dst += r;
    pos += r;
    left -= r;
  }
}

at::Tensor SafetensorsReader::read_all(const std::string& name) const {
  const TensorEntry& e = entry(name);
  at::Tensor out = at::empty({e.numel()}, at::TensorOptions().dtype(scalar_type_of(e.dtype)));
  read(name, 0, e.numel(), out);
  return out.view(e.shape);
}

void SafetensorsReader::verify(const std::string& name) const {
  if (verified_[name]) return;
  auto it = metadata_.find("crc32:" + name);
  if (it == metadata_.end()) throw CheckpointError(path_ + ": tensor '" + name + "' has no checksum");
  // Streamed in blocks, so verifying never holds a whole tensor.
  const TensorEntry& e = entry(name);
  // Version 2 keys the checksum by the tensor's byte range as well as its name.
  std::string expected = it->second;
  if (size_t colon = expected.rfind(':'); colon != std::string::npos) {
    if (expected.substr(0, colon) != std::to_string(e.begin) + ":" + std::to_string(e.end))
      throw CheckpointError(path_ + ": tensor '" + name + "' sits at bytes [" + std::to_string(e.begin) + ", " +
                            std::to_string(e.end) + ") but its checksum was taken at " + expected.substr(0, colon) +
                            " (the header was edited)");
    expected = expected.substr(colon + 1);
  }
  std::vector<char> block(std::min<int64_t>(e.end - e.begin, 64 << 20));
  uLong crc = crc32(0L, Z_NULL, 0);
  for (int64_t pos = e.begin; pos < e.end;) {
    ssize_t r = ::pread(fd_, block.data(), static_cast<size_t>(std::min<int64_t>(e.end - pos, block.size())),
                        data_start_ + pos);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw CheckpointError("reading '" + name + "' from " + path_ + ": unexpected end of file");
    crc = crc32(crc, reinterpret_cast<const Bytef*>(block.data()), static_cast<uInt>(r));
    pos += r;
  }
  if (std::to_string(static_cast<uint32_t>(crc)) != expected)
    throw CheckpointError(path_ + ": tensor '" + name + "' fails its CRC32 check (the file is corrupted)");
  verified_[name] = true;
}

}  // namespace zeal::checkpoint
