// Zeal's checkpoint format: one directory per tag, self-describing, resharding on load.
//
//   <save_dir>/latest                    the newest complete tag (replaced by rename, last)
//   <save_dir>/<tag>/zeal_checkpoint.json the manifest (below), written by rank 0
//   <save_dir>/<tag>/shard_rNNNNN.safetensors
//                                        rank N's fp32 master weights and optimizer state
//                                        ("master", "exp_avg", ...), flat, in its local order
//   <save_dir>/<tag>/module_extra.safetensors
//                                        module state the engine does not train (buffers, frozen)
//
// The manifest holds the format name and version, the ZeRO stage, world size, model dtype,
// optimizer, every parameter's name and full shape, and the fragment table (zero/layout.h) of
// every saved rank. A reader assembles any element range of any parameter from the fragments,
// so a checkpoint loads under any world size and stage. Every tensor carries a CRC32.
//
// Note [Atomic checkpoints]: all ranks write into <save_dir>/.tmp-<tag>; after a barrier rank 0
// writes the manifest there, renames the directory to <tag> and only then replaces `latest`. A
// crash at any point leaves `latest` naming the previous complete checkpoint.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "zeal/checkpoint/safetensors.h"
#include "zeal/zero/layout.h"

namespace zeal::checkpoint {

constexpr const char* kFormat = "zeal-checkpoint";
constexpr int kVersion = 1;
constexpr const char* kManifestName = "zeal_checkpoint.json";
constexpr const char* kExtraName = "module_extra.safetensors";

struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
};

struct Manifest {
  int64_t stage = 0;
  int64_t world_size = 1;
  std::string model_dtype;
  std::string optimizer;
  std::vector<ParamInfo> params;
  std::vector<std::vector<zero::Fragment>> fragments;  // per saved rank (empty: that rank wrote no shard)
  std::vector<std::string> state_names;                // optimizer state tensors in each shard
  std::string engine_state;                            // JSON object: counters, loss scaler, scheduler
  std::string client_state;                            // JSON, the user's
};

std::string shard_file_name(int rank);
void write_manifest(const std::string& path, const Manifest& manifest);
Manifest read_manifest(const std::string& path);  // validates; throws CheckpointError

// The directory of `tag` under save_dir; an empty tag means the one `latest` names.
std::string resolve_tag(const std::string& save_dir, const std::string& tag);

// Reads element ranges of saved parameters, across however many rank files hold them.
class CheckpointReader {
 public:
  explicit CheckpointReader(std::string dir);
  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }
  // Elements [begin, end) of saved parameter `param`'s tensor `what` ("master", "exp_avg", ...)
  // into out (fp32, contiguous CPU, end - begin elements). Checks CRCs of the tensors it touches.
  void read(const std::string& what, int64_t param, int64_t begin, int64_t end, at::Tensor& out);
  int64_t find_param(const std::string& name) const;  // -1 if absent

 private:
  SafetensorsReader& shard(size_t rank);
  std::string dir_;
  Manifest manifest_;
  std::vector<std::vector<std::pair<size_t, zero::Fragment>>> by_param_;  // param -> (rank, fragment)
  std::vector<std::unique_ptr<SafetensorsReader>> shards_;
  std::map<std::string, int64_t> name_index_;
};

// Writes a consolidated fp32 state dict (parameter name -> full tensor) to `out_path` as
// safetensors, one parameter at a time: peak memory is about the largest parameter.
void to_fp32(const std::string& checkpoint_dir, const std::string& out_path);
// The same over the parts of one checkpoint (pipeline stages): each parameter once, from the first
// part that holds it.
void to_fp32_parts(const std::vector<std::string>& dirs, const std::string& out_path);

// Crash-safe directory helpers.
void make_dirs(const std::string& path);
void remove_tree(const std::string& path);
void rename_path(const std::string& from, const std::string& to);
void write_text_atomically(const std::string& path, const std::string& text);
void fsync_dir(const std::string& path);

}  // namespace zeal::checkpoint
