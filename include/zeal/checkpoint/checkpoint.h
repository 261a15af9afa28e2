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
// A checkpoint may come in parts, one directory each under the tag (a pipeline stage, a tensor
// rank: zeal.checkpoint writes <tag>/parts.json naming them). A parameter cut by tensor
// parallelism is saved by each tensor rank under its full name with its TensorSplit: the dim it
// is cut along and where its slice starts. ParameterSource reads any slice of the full tensor
// from whatever slices were saved (Note [Moving between tensor-parallel sizes]).
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
// 2: manifests sealed with a checksum, shards tied to their save (Note [Checkpoint integrity]
// in checkpoint/integrity.h). Version 1 still loads.
constexpr int kVersion = 2;
constexpr const char* kManifestName = "zeal_checkpoint.json";
constexpr const char* kExtraName = "module_extra.safetensors";
constexpr const char* kPartsName = "parts.json";  // a checkpoint in parts: names them (sealed JSON)

// Where a tensor-parallel slice sits in its full tensor: indices [offset, offset + shape[dim])
// along dim; every other dim whole. dim < 0: the tensor is whole.
struct TensorSplit {
  int64_t dim = -1;
  int64_t offset = 0;
  std::vector<int64_t> full_shape;
  bool split() const { return dim >= 0; }
};

struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;  // of the saved tensor (the slice, when split)
  int64_t numel = 0;
  TensorSplit split;
  // The parameter's other names in the module's state_dict (tied weights: one tensor, two names);
  // the fp32 export writes it under each, so load_state_dict(strict=True) finds them all.
  std::vector<std::string> aliases;
  // The whole parameter's shape: the split's, else the saved tensor's own.
  const std::vector<int64_t>& full_shape() const { return split.split() ? split.full_shape : shape; }
};

// What the manifest records of one file it names, so that no other file can stand in for it.
struct FileSeal {
  int64_t bytes = 0;          // the file's size
  std::string header_digest;  // xxh64 of its safetensors header bytes; empty: no file (or version 1)
};

struct Manifest {
  int64_t version = kVersion;
  std::string save_id;  // version 2: the save's identity, also in every shard's metadata
  std::string part;     // version 2: the tag or part name it was saved under, also in every shard
  int64_t stage = 0;
  int64_t world_size = 1;
  std::string model_dtype;
  std::string optimizer;
  std::vector<ParamInfo> params;
  std::vector<std::vector<zero::Fragment>> fragments;  // per saved rank (empty: that rank wrote no shard)
  std::vector<FileSeal> shard_seals;                   // per saved rank, as fragments (version 2)
  FileSeal extra_seal;                                 // module_extra.safetensors (version 2)
  std::vector<std::string> state_names;                // optimizer state tensors in each shard
  std::string engine_state;                            // JSON object: counters, loss scaler, scheduler
  std::string client_state;                            // JSON, the user's
};

std::string shard_file_name(int rank);
// The metadata every shard of a save carries (version 2): its place in the save.
std::map<std::string, std::string> shard_metadata(const std::string& save_id, const std::string& part, int rank,
                                                  int world_size);
// The seal of a written safetensors file (its size and header digest), for the manifest.
FileSeal seal_of(const std::string& path);
void write_manifest(const std::string& path, const Manifest& manifest);
// Validates the whole manifest before anything is read: its checksum, the fragment table (each
// parameter covered exactly once, each rank's local ranges disjoint) and the engine counters.
// Throws CheckpointError naming the file.
Manifest read_manifest(const std::string& path);
// Opens module_extra.safetensors of checkpoint dir `dir`, checked against its manifest.
std::unique_ptr<SafetensorsReader> open_extra(const std::string& dir);

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
  // The whole tensor `name` of rank `rank`'s shard (its CRC checked), or undefined if the shard
  // has none: a rank's own state that is not a parameter's (LoCo's errors).
  at::Tensor read_rank_tensor(size_t rank, const std::string& name);

 private:
  SafetensorsReader& shard(size_t rank);
  std::string dir_;
  Manifest manifest_;
  std::vector<std::vector<std::pair<size_t, zero::Fragment>>> by_param_;  // param -> (rank, fragment)
  std::vector<std::unique_ptr<SafetensorsReader>> shards_;
  std::map<std::string, int64_t> name_index_;
};

// Note [Moving between tensor-parallel sizes]: a slice is cut along one dim d, so viewed as
// (outer, n, inner) -- outer the product of the dims before d, inner of those after -- the full
// tensor is (outer, N, inner) and slice element (o, j, k) is full element (o, offset + j, k). For
// each outer index o, the rows a target slice shares with a saved slice are one contiguous run in
// both flat orders; a target element range is a list of such runs (runs that continue each other
// in both are merged, so an unchanged layout reads whole fragments). Slices of every tensor size
// dividing N are contiguous in the full tensor, which is why Zeal's layers cut q, k and v as
// separate column-parallel layers rather than one fused, head-interleaved weight.

// One copy: `length` elements from flat index saved_begin of saved slice `piece` to flat index
// local_begin (relative to the requested range) of the target.
struct SliceRun {
  size_t piece;
  int64_t saved_begin;
  int64_t local_begin;
  int64_t length;
};
// The runs that fill elements [begin, end) of a target slice [target_offset, + target_size) of a
// tensor of full_shape cut along dim, from saved slices (offset, size) along the same dim that
// cover [0, full_shape[dim]) (overlaps allowed; the first holding slice wins). Pure; tested alone.
std::vector<SliceRun> slice_runs(const std::vector<int64_t>& full_shape, int64_t dim, int64_t target_offset,
                                 int64_t target_size, const std::vector<std::pair<int64_t, int64_t>>& saved,
                                 int64_t begin, int64_t end);

// Every saved copy of one parameter across the parts of a checkpoint, read as the target tensor
// (a slice, or the whole) wants it. The constructor checks that the copies agree on the full
// shape and the split dim and cover the tensor, with errors naming the parameter.
class ParameterSource {
 public:
  struct Piece {
    CheckpointReader* reader;
    int64_t index;  // the parameter's index in that reader's manifest
  };
  ParameterSource(const std::string& name, const std::vector<Piece>& pieces, const std::vector<int64_t>& target_shape,
                  const TensorSplit& target_split);
  // Elements [begin, end) of the target's flat order into out (fp32, contiguous CPU).
  void read(const std::string& what, int64_t begin, int64_t end, at::Tensor& out) const;
  const std::vector<int64_t>& full_shape() const { return full_shape_; }

 private:
  std::vector<Piece> pieces_;                      // the slices used, in the order of saved_
  std::vector<std::pair<int64_t, int64_t>> saved_;  // (offset, size) along dim_
  std::vector<int64_t> full_shape_;
  std::vector<int64_t> run_shape_;  // full_shape_, a scalar as {1}
  int64_t dim_ = 0;  // the dim the runs are computed along (0 when nothing is split)
  int64_t target_offset_ = 0, target_size_ = 0;
};

// The parameters of a checkpoint's parts (pipeline stages, tensor ranks), each whole: a tied
// module's copies and a tensor-parallel parameter's slices come together under its name, in the
// order of first appearance.
class WholeParameters {
 public:
  explicit WholeParameters(const std::vector<std::string>& dirs);
  size_t size() const { return names_.size(); }
  const std::string& name(size_t i) const { return names_[i]; }
  const std::vector<int64_t>& shape(size_t i) const { return sources_[i].full_shape(); }
  at::Tensor read(size_t i) const;  // fp32 master weights, full shape

 private:
  std::vector<std::unique_ptr<CheckpointReader>> readers_;
  std::vector<std::string> names_;
  std::vector<ParameterSource> sources_;
};

// Writes a consolidated fp32 state dict (parameter name -> full tensor) to `out_path` as
// safetensors, one parameter at a time: peak memory is about the largest parameter.
void to_fp32(const std::string& checkpoint_dir, const std::string& out_path);
// The same over the parts of one checkpoint (pipeline stages, tensor ranks): each parameter once,
// whole (tensor-parallel slices joined).
void to_fp32_parts(const std::vector<std::string>& dirs, const std::string& out_path);

// Crash-safe directory helpers.
void make_dirs(const std::string& path);
void remove_tree(const std::string& path);
void rename_path(const std::string& from, const std::string& to);
void write_text_atomically(const std::string& path, const std::string& text);
void fsync_dir(const std::string& path);

}  // namespace zeal::checkpoint
