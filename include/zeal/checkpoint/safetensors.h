// The safetensors file format (https://github.com/huggingface/safetensors), written and read
// here so that checkpoints never go through pickle: 8 bytes of little-endian header length, a
// JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
// then the raw little-endian tensor bytes. Readers take element ranges with pread, so a loader
// touches only the bytes it needs.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace zeal::checkpoint {

struct TensorEntry {
  std::string dtype;  // "F32", "BF16", "F16", "F64", "I64", ...
  std::vector<int64_t> shape;
  int64_t begin = 0;  // byte offsets into the data section
  int64_t end = 0;
  int64_t numel() const;
  int64_t element_size() const;
};

const char* safetensors_dtype(at::ScalarType t);
at::ScalarType scalar_type_of(const std::string& safetensors_dtype);  // throws CheckpointError

// Writes `tensors` (contiguous, CPU or not) to `path`, then fsyncs it. A CRC32 of every tensor's
// bytes goes into the metadata as "crc32:<name>" = "<begin>:<end>:<crc>" (keyed by the tensor's
// byte range too, so entries cannot trade places), and the data section's length as "data_bytes". `progress` (may be empty) is called with
// "half" once half the data bytes are written (the fault-injection point of the tests).
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata,
                       const std::function<void(const std::string&)>& progress = {});

class SafetensorsReader {
 public:
  // Validates the header and that the file holds every byte it promises (exactly, when it records
  // data_bytes); opens regular files only; throws CheckpointError naming the file.
  explicit SafetensorsReader(std::string path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorEntry& entry(const std::string& name) const;
  const std::string& path() const { return path_; }
  int64_t file_size() const { return file_size_; }
  const std::string& header_digest() const { return header_digest_; }  // xxh64 of the header bytes
  bool has(const std::string& name) const { return entries_.count(name) != 0; }

  // Elements [begin, end) of tensor `name` (flattened) into `out`, a contiguous CPU tensor of the
  // same dtype and end - begin elements.
  void read(const std::string& name, int64_t begin, int64_t end, at::Tensor& out) const;
  at::Tensor read_all(const std::string& name) const;
  // Recomputes the tensor's CRC32 and compares it with the metadata's (once per tensor).
  void verify(const std::string& name) const;

 private:
  std::string path_;
  int fd_ = -1;
  int64_t data_start_ = 0;
  int64_t file_size_ = 0;
  std::string header_digest_;
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
  mutable std::map<std::string, bool> verified_;
};

}  // namespace zeal::checkpoint
