#include "zeal/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include "zeal/checkpoint/integrity.h"
#include "zeal/core/error.h"
#include "zeal/core/json.h"
#include "zeal/core/logging.h"

namespace zeal::checkpoint {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string shard_file_name(int rank) {
  char name[64];
  std::snprintf(name, sizeof(name), "shard_r%05d.safetensors", rank);
  return name;
}

void make_dirs(const std::string& path) {
  std::error_code ec;
  fs::create_directories(path, ec);
  if (ec) throw IoError("cannot create directory " + path + ": " + ec.message());
}

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) throw IoError("cannot remove " + path + ": " + ec.message());
}

void rename_path(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0)
    throw IoError("cannot rename " + from + " to " + to + ": " + std::strerror(errno));
}

void fsync_dir(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void write_text_atomically(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw IoError("cannot create " + tmp + ": " + std::strerror(errno));
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) throw IoError("cannot write " + tmp + ": " + std::strerror(errno));
  rename_path(tmp, path);
  fsync_dir(fs::path(path).parent_path().string());
}

std::map<std::string, std::string> shard_metadata(const std::string& save_id, const std::string& part, int rank,
                                                  int world_size) {
  return {{"format", kFormat},
          {"save_id", save_id},
          {"part", part},
          {"rank", std::to_string(rank)},
          {"world_size", std::to_string(world_size)}};
}

FileSeal seal_of(const std::string& path) {
  SafetensorsReader reader(path);
  return {reader.file_size(), reader.header_digest()};
}

void write_manifest(const std::string& path, const Manifest& m) {
  json params = json::array();
  for (const ParamInfo& p : m.params) {
    json entry = {{"name", p.name}, {"shape", p.shape}, {"numel", p.numel}};
    if (p.split.split())
      entry["split"] = {{"dim", p.split.dim}, {"offset", p.split.offset}, {"full_shape", p.split.full_shape}};
    if (!p.aliases.empty()) entry["aliases"] = p.aliases;
    params.push_back(entry);
  }
  json ranks = json::array();
  for (size_t r = 0; r < m.fragments.size(); ++r) {
    const auto& frags = m.fragments[r];
    json list = json::array();
    for (const zero::Fragment& f : frags) list.push_back({f.param, f.begin, f.end, f.local});
    json entry = {{"file", frags.empty() ? "" : shard_file_name(static_cast<int>(r))}, {"fragments", list}};
    if (r < m.shard_seals.size() && !frags.empty())
      entry["seal"] = {{"bytes", m.shard_seals[r].bytes}, {"header_xxh64", m.shard_seals[r].header_digest}};
    ranks.push_back(entry);
  }
  json doc = {{"format", kFormat},
              {"version", kVersion},
              {"save_id", m.save_id},
              {"part", m.part},
              {"zero_stage", m.stage},
              {"world_size", m.world_size},
              {"model_dtype", m.model_dtype},
              {"optimizer", m.optimizer},
              {"optimizer_state", m.state_names},
              {"parameters", params},
              {"fragment_columns", {"param", "begin", "end", "local"}},
              {"ranks", ranks},
              {"extra", {{"bytes", m.extra_seal.bytes}, {"header_xxh64", m.extra_seal.header_digest}}},
              {"engine", json::parse(m.engine_state)},
              {"client_state", json::parse(m.client_state)}};
  write_text_atomically(path, seal_json(std::move(doc)));
}

namespace {

// The engine counters a checkpoint restores, each a non-negative integer, consistent with each
// other: a step can be skipped (fp16 overflow) only once it happened, and neither the optimizer
// nor the LR schedule can have stepped more often than the engine.
void validate_engine_state(const json& e, const std::function<CheckpointError(const std::string&)>& bad) {
  if (!e.is_object()) throw bad("'engine' is not an object");
  auto count = [&](const char* key) -> int64_t {
    auto it = e.find(key);
    if (it == e.end()) throw bad(std::string("'engine.") + key + "' is missing");
    if (!it->is_number_integer() || it->get<int64_t>() < 0)
      throw bad(std::string("'engine.") + key + "' must be an integer >= 0, got " + json_preview(*it));
    return it->get<int64_t>();
  };
  const int64_t steps = count("global_steps"), skipped = count("skipped_steps");
  count("global_samples");
  const int64_t micro = count("micro_steps"), scheduler = count("scheduler_iteration"),
                optimizer = count("optimizer_steps");
  if (skipped > steps) throw bad("'engine.skipped_steps' (" + std::to_string(skipped) + ") exceeds 'engine.global_steps' (" + std::to_string(steps) + ")");
  if (micro < steps) throw bad("'engine.micro_steps' (" + std::to_string(micro) + ") is below 'engine.global_steps' (" + std::to_string(steps) + ")");
  if (scheduler > steps) throw bad("'engine.scheduler_iteration' (" + std::to_string(scheduler) + ") exceeds 'engine.global_steps' (" + std::to_string(steps) + ")");
  if (optimizer > steps) throw bad("'engine.optimizer_steps' (" + std::to_string(optimizer) + ") exceeds 'engine.global_steps' (" + std::to_string(steps) + ")");
  auto ls = e.find("loss_scaler");
  if (ls == e.end() || !ls->is_object()) throw bad("'engine.loss_scaler' is missing");
  auto number = [&](const char* key, bool integer, double low) {
    auto it = ls->find(key);
    if (it == ls->end() || !it->is_number() || (integer && !it->is_number_integer()) || !(it->get<double>() >= low) ||
        !std::isfinite(it->get<double>()))
      throw bad(std::string("'engine.loss_scaler.") + key + "' must be a " + (integer ? "integer" : "number") +
                " >= " + json_preview(json(low)) + ", got " + (it == ls->end() ? "nothing" : json_preview(*it)));
  };
  number("scale", false, 0.0);
  number("current_hysteresis", true, 0);
  number("iteration", true, 0);
  number("last_overflow_iteration", true, -1);
  if (auto sc = e.find("optimizer_scalars"); sc != e.end()) {
    if (!sc->is_object()) throw bad("'engine.optimizer_scalars' is not an object");
    for (auto it = sc->begin(); it != sc->end(); ++it) {
      if (!it->is_array()) throw bad("'engine.optimizer_scalars." + it.key() + "' is not a list");
      for (const json& v : *it)
        if (!v.is_number()) throw bad("'engine.optimizer_scalars." + it.key() + "' holds a non-number");
    }
  }
}

}  // namespace

Manifest read_manifest(const std::string& path) {
  auto bad = [&](const std::string& what) -> CheckpointError {
    return CheckpointError("checkpoint manifest " + path + " is invalid: " + what);
  };
  bool sealed = false;
  json doc;
  try {
    doc = read_sealed_json(path, &sealed);
  } catch (const CheckpointError& e) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
      throw CheckpointError("no checkpoint manifest at " + path + " (not a Zeal checkpoint, or an incomplete save)");
    throw;
  }
  if (doc.value("format", json()) != kFormat) throw bad("format is not '" + std::string(kFormat) + "'");
  const json version = doc.value("version", json());
  if (!version.is_number_integer() || version.get<int64_t>() < 1 || version.get<int64_t>() > kVersion)
    throw bad("format version " + json_preview(version) + "; this Zeal reads versions 1 to " + std::to_string(kVersion) +
              (version.is_number_integer() && version.get<int64_t>() > kVersion ? " (saved by a newer Zeal: upgrade)" : ""));
  Manifest m;
  m.version = version.get<int64_t>();
  if (m.version >= 2 && !sealed) throw bad("it has no checksum (a version 2 manifest always has one: edited?)");
  try {
    if (m.version >= 2) {
      m.save_id = doc.at("save_id").get<std::string>();
      m.part = doc.at("part").get<std::string>();
      if (m.save_id.empty()) throw bad("'save_id' is empty");
    }
    m.stage = doc.at("zero_stage").get<int64_t>();
    m.world_size = doc.at("world_size").get<int64_t>();
    if (m.stage < 0 || m.stage > 3) throw bad("'zero_stage' " + std::to_string(m.stage) + " is not 0-3");
    if (m.world_size < 1) throw bad("'world_size' " + std::to_string(m.world_size) + " is below 1");
    m.model_dtype = doc.at("model_dtype").get<std::string>();
    m.optimizer = doc.at("optimizer").get<std::string>();
    m.state_names = doc.at("optimizer_state").get<std::vector<std::string>>();
    for (const json& p : doc.at("parameters")) {
      ParamInfo info{p.at("name").get<std::string>(), p.at("shape").get<std::vector<int64_t>>(),
                     p.at("numel").get<int64_t>(), {}};
      int64_t numel = 1;
      for (int64_t d : info.shape) {
        if (d < 0 || (d > 0 && numel > (int64_t{1} << 50) / d))
          throw bad("parameter '" + info.name + "' has an impossible shape " + p.at("shape").dump());
        numel *= d;
      }
      if (numel != info.numel)
        throw bad("parameter '" + info.name + "' records " + std::to_string(info.numel) + " elements for shape " +
                  p.at("shape").dump());
      if (p.contains("aliases")) info.aliases = p.at("aliases").get<std::vector<std::string>>();
      if (p.contains("split")) {
        const json& sp = p.at("split");
        info.split = {sp.at("dim").get<int64_t>(), sp.at("offset").get<int64_t>(),
                      sp.at("full_shape").get<std::vector<int64_t>>()};
        const TensorSplit& t = info.split;
        bool ok = t.dim >= 0 && t.dim < static_cast<int64_t>(info.shape.size()) &&
                  t.full_shape.size() == info.shape.size() && t.offset >= 0 &&
                  t.offset + info.shape[t.dim] <= t.full_shape[t.dim];
        for (size_t d = 0; ok && d < info.shape.size(); ++d)
          ok = static_cast<int64_t>(d) == t.dim || info.shape[d] == t.full_shape[d];
        if (!ok) throw bad("the tensor-parallel split of parameter '" + info.name + "' does not fit its shape");
      }
      m.params.push_back(std::move(info));
    }
    for (const json& r : doc.at("ranks")) {
      std::vector<zero::Fragment> frags;
      for (const json& f : r.at("fragments")) {
        zero::Fragment fr{f.at(0).get<int64_t>(), f.at(1).get<int64_t>(), f.at(2).get<int64_t>(), f.at(3).get<int64_t>()};
        if (fr.param < 0 || fr.param >= static_cast<int64_t>(m.params.size()) || fr.begin < 0 || fr.end <= fr.begin ||
            fr.end > m.params[fr.param].numel || fr.local < 0 || fr.local > (int64_t{1} << 50))
          throw bad("a fragment of rank " + std::to_string(m.fragments.size()) + " is out of range");
        frags.push_back(fr);
      }
      FileSeal seal;
      if (m.version >= 2 && !frags.empty()) {
        const json& s = r.at("seal");
        seal = {s.at("bytes").get<int64_t>(), s.at("header_xxh64").get<std::string>()};
      }
      m.fragments.push_back(std::move(frags));
      m.shard_seals.push_back(seal);
    }
    if (m.version >= 2) {
      const json& e = doc.at("extra");
      m.extra_seal = {e.at("bytes").get<int64_t>(), e.at("header_xxh64").get<std::string>()};
    }
    validate_engine_state(doc.at("engine"), bad);
    m.engine_state = doc.at("engine").dump();
    m.client_state = doc.at("client_state").dump();
  } catch (const json::exception& e) {
    // A key missing or of the wrong type: nlohmann's message names the key ("key 'x' not found").
    throw bad(e.what());
  }
  if (static_cast<int64_t>(m.fragments.size()) != m.world_size)
    throw bad("lists " + std::to_string(m.fragments.size()) + " ranks for a world of " + std::to_string(m.world_size));
  // The fragment table as a whole: every element of every parameter held exactly once, and no
  // two fragments of one rank sharing local elements.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> spans(m.params.size());
  for (size_t r = 0; r < m.fragments.size(); ++r) {
    std::vector<std::pair<int64_t, int64_t>> local;
    for (const zero::Fragment& f : m.fragments[r]) {
      spans[f.param].push_back({f.begin, f.end});
      local.push_back({f.local, f.local + (f.end - f.begin)});
    }
    std::sort(local.begin(), local.end());
    for (size_t i = 1; i < local.size(); ++i)
      if (local[i].first < local[i - 1].second)
        throw bad("two fragments of rank " + std::to_string(r) + " overlap at local element " +
                  std::to_string(local[i].first));
  }
  for (size_t p = 0; p < m.params.size(); ++p) {
    std::sort(spans[p].begin(), spans[p].end());
    int64_t next = 0;
    for (const auto& [begin, end] : spans[p]) {
      if (begin < next)
        throw bad("parameter '" + m.params[p].name + "' has elements [" + std::to_string(begin) + ", " +
                  std::to_string(std::min(end, next)) + ") in two fragments");
      if (begin > next) break;
      next = end;
    }
    if (next != m.params[p].numel)
      throw bad("parameter '" + m.params[p].name + "' is only partly covered by the fragment table (elements [0, " +
                std::to_string(next) + ") of " + std::to_string(m.params[p].numel) + " in order)");
  }
  return m;
}

namespace {

// That a file the manifest names is the one it recorded (version 2): the same save, the place it
// was written for (rank, part, world size), its size and its header (Note [Checkpoint integrity]).
void check_sealed(const SafetensorsReader& file, const Manifest& m, int64_t rank, const FileSeal& seal) {
  const auto& meta = file.metadata();
  auto get = [&](const char* key) {
    auto it = meta.find(key);
    return it == meta.end() ? std::string("(none)") : it->second;
  };
  const std::string& path = file.path();
  if (get("rank") != std::to_string(rank))
    throw CheckpointError(path + " does not belong to rank " + std::to_string(rank) + " of this checkpoint (it says rank " +
                          get("rank") + "; mixed-up files?)");
  if (m.version < 2) return;
  if (get("save_id") != m.save_id)
    throw CheckpointError(path + " belongs to save " + get("save_id") + ", not to this checkpoint's save " + m.save_id +
                          " (a shard copied from another checkpoint?)");
  if (get("part") != m.part || get("world_size") != std::to_string(m.world_size))
    throw CheckpointError(path + " was saved as rank " + get("rank") + " of " + get("world_size") + " in part '" +
                          get("part") + "', but the manifest is part '" + m.part + "' of " +
                          std::to_string(m.world_size) + " ranks");
  if (file.file_size() != seal.bytes)
    throw CheckpointError(path + " has " + std::to_string(file.file_size()) + " bytes; the manifest recorded " +
                          std::to_string(seal.bytes) + " (truncated or replaced)");
  if (file.header_digest() != seal.header_digest)
    throw CheckpointError(path + ": its header differs from the one the manifest recorded (xxh64 " +
                          file.header_digest() + ", recorded " + seal.header_digest + "): edited or replaced");
}

}  // namespace

std::unique_ptr<SafetensorsReader> open_extra(const std::string& dir) {
  Manifest m = read_manifest((fs::path(dir) / kManifestName).string());
  auto reader = std::make_unique<SafetensorsReader>((fs::path(dir) / kExtraName).string());
  check_sealed(*reader, m, 0, m.extra_seal);  // rank 0 writes it
  return reader;
}

std::string resolve_tag(const std::string& save_dir, const std::string& tag) {
  if (!tag.empty()) return (fs::path(save_dir) / tag).string();
  return (fs::path(save_dir) / read_latest(save_dir)).string();
}

CheckpointReader::CheckpointReader(std::string dir) : dir_(std::move(dir)) {
  manifest_ = read_manifest((fs::path(dir_) / kManifestName).string());
  if (manifest_.version < 2)
    log("checkpoint", LogLevel::kWarn, "checkpoint ", dir_, " is of format version ", manifest_.version,
        ": it loads, but without the manifest checksum and shard seals of version 2 (save it again to add them)");
  by_param_.resize(manifest_.params.size());
  for (size_t r = 0; r < manifest_.fragments.size(); ++r)
    for (const zero::Fragment& f : manifest_.fragments[r]) by_param_[f.param].push_back({r, f});
  for (size_t p = 0; p < manifest_.params.size(); ++p) name_index_[manifest_.params[p].name] = static_cast<int64_t>(p);
  shards_.resize(manifest_.fragments.size());
}

int64_t CheckpointReader::find_param(const std::string& name) const {
  auto it = name_index_.find(name);
  return it == name_index_.end() ? -1 : it->second;
}

at::Tensor CheckpointReader::read_rank_tensor(size_t rank, const std::string& name) {
  if (rank >= shards_.size()) return at::Tensor();
  SafetensorsReader& reader = shard(rank);
  if (!reader.has(name)) return at::Tensor();
  reader.verify(name);
  return reader.read_all(name);
}

SafetensorsReader& CheckpointReader::shard(size_t rank) {
  if (!shards_[rank]) {
    const std::string path = (fs::path(dir_) / shard_file_name(static_cast<int>(rank))).string();
    auto reader = std::make_unique<SafetensorsReader>(path);
    check_sealed(*reader, manifest_, static_cast<int64_t>(rank),
                 manifest_.version >= 2 ? manifest_.shard_seals[rank] : FileSeal{});
    // Every tensor the fragments index must be there, fp32, flat, and long enough.
    int64_t needed = 0;
    for (const zero::Fragment& f : manifest_.fragments[rank]) needed = std::max(needed, f.local + (f.end - f.begin));
    std::vector<std::string> names{"master"};
    names.insert(names.end(), manifest_.state_names.begin(), manifest_.state_names.end());
    for (const std::string& name : names) {
      if (!reader->has(name)) throw CheckpointError(path + " has no tensor '" + name + "' (the manifest lists it)");
      const TensorEntry& e = reader->entry(name);
      if (e.dtype != "F32" || e.shape.size() != 1 || e.numel() < needed)
        throw CheckpointError(path + ": tensor '" + name + "' is " + e.dtype + " of " + std::to_string(e.numel()) +
                              " elements in " + std::to_string(e.shape.size()) +
                              " dims; the manifest needs F32, flat, of at least " + std::to_string(needed));
    }
    shards_[rank] = std::move(reader);
  }
  return *shards_[rank];
}

void CheckpointReader::read(const std::string& what, int64_t param, int64_t begin, int64_t end, at::Tensor& out) {
  ZEAL_INTERNAL_ASSERT(param >= 0 && param < static_cast<int64_t>(by_param_.size()), "bad parameter index");
  int64_t filled = 0;
  for (const auto& [rank, f] : by_param_[param]) {
    int64_t lo = std::max(begin, f.begin), hi = std::min(end, f.end);
    if (lo >= hi) continue;
    SafetensorsReader& file = shard(rank);
    file.verify(what);
    at::Tensor piece = out.slice(0, lo - begin, hi - begin);
    file.read(what, f.local + (lo - f.begin), f.local + (hi - f.begin), piece);
    filled += hi - lo;
  }
  if (filled < end - begin)
    throw CheckpointError("checkpoint " + dir_ + " lacks elements of '" + manifest_.params[param].name + "' (" + what + ")");
}

std::vector<SliceRun> slice_runs(const std::vector<int64_t>& full_shape, int64_t dim, int64_t target_offset,
                                 int64_t target_size, const std::vector<std::pair<int64_t, int64_t>>& saved,
                                 int64_t begin, int64_t end) {
  ZEAL_INTERNAL_ASSERT(dim >= 0 && dim < static_cast<int64_t>(full_shape.size()), "bad split dim");
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= full_shape[d];
  for (size_t d = dim + 1; d < full_shape.size(); ++d) inner *= full_shape[d];
  const int64_t target_end = target_offset + target_size;
  ZEAL_INTERNAL_ASSERT(target_offset >= 0 && target_end <= full_shape[dim], "target slice outside the tensor");
  ZEAL_INTERNAL_ASSERT(0 <= begin && begin <= end && end <= outer * target_size * inner, "range outside the slice");
  std::vector<SliceRun> runs;
  if (begin == end) return runs;

  // Rows [j, j_end) of the target come from saved slice `piece`: the first slice holding row j,
  // up to where it ends or an earlier slice takes over.
  struct Segment {
    int64_t j, j_end;
    size_t piece;
  };
  std::vector<Segment> segments;
  for (int64_t j = target_offset; j < target_end;) {
    size_t p = 0;
    while (p < saved.size() && !(saved[p].first <= j && j < saved[p].first + saved[p].second)) ++p;
    if (p == saved.size()) throw CheckpointError("row " + std::to_string(j) + " of dim " + std::to_string(dim) +
                                                 " is in no saved slice");
    int64_t j_end = std::min(target_end, saved[p].first + saved[p].second);
    for (size_t q = 0; q < p; ++q)
      if (saved[q].first > j) j_end = std::min(j_end, saved[q].first);
    segments.push_back({j, j_end, p});
    j = j_end;
  }
  const int64_t row = target_size * inner;  // elements of one outer index in the target
  for (int64_t o = begin / row; o <= (end - 1) / row; ++o) {
    for (const Segment& s : segments) {
      const int64_t local = o * row + (s.j - target_offset) * inner;
      const int64_t length = (s.j_end - s.j) * inner;
      const int64_t lo = std::max(local, begin), hi = std::min(local + length, end);
      if (lo >= hi) continue;
      const auto [offset, size] = saved[s.piece];
      const int64_t from = o * size * inner + (s.j - offset) * inner + (lo - local);
      SliceRun run{s.piece, from, lo - begin, hi - lo};
      if (!runs.empty()) {
        SliceRun& last = runs.back();
        if (last.piece == run.piece && last.saved_begin + last.length == run.saved_begin &&
            last.local_begin + last.length == run.local_begin) {
          last.length += run.length;
          continue;
        }
      }
      runs.push_back(run);
    }
  }
  return runs;
}

ParameterSource::ParameterSource(const std::string& name, const std::vector<Piece>& pieces,
                                 const std::vector<int64_t>& target_shape, const TensorSplit& target_split) {
  ZEAL_INTERNAL_ASSERT(!pieces.empty(), "a parameter source needs a saved copy");
  full_shape_ = target_split.split() ? target_split.full_shape : target_shape;
  auto info = [](const Piece& p) -> const ParamInfo& { return p.reader->manifest().params[p.index]; };
  auto where = [&](const Piece& p) { return p.reader->dir(); };
  for (const Piece& p : pieces) {
    const ParamInfo& i = info(p);
    if (i.full_shape() != full_shape_)
      throw CheckpointError("parameter '" + name + "' has " + (i.split.split() || target_split.split() ? "full " : "") +
                            "shape " + c10::str(c10::IntArrayRef(i.full_shape())) + " in checkpoint " + where(p) +
                            " but " + c10::str(c10::IntArrayRef(full_shape_)) + " in the model");
  }
  // A whole saved copy serves any target; else the saved slices, which must share one dim.
  const Piece* whole = nullptr;
  for (const Piece& p : pieces)
    if (!info(p).split.split()) {
      whole = &p;
      break;
    }
  std::vector<int64_t> shape = full_shape_.empty() ? std::vector<int64_t>{1} : full_shape_;  // a scalar as one row
  if (whole) {
    dim_ = target_split.split() ? target_split.dim : 0;
    pieces_ = {*whole};
    saved_ = {{0, shape[dim_]}};
  } else {
    dim_ = info(pieces.front()).split.dim;
    for (const Piece& p : pieces) {
      const ParamInfo& i = info(p);
      if (i.split.dim != dim_)
        throw CheckpointError("the saved slices of parameter '" + name + "' are cut along dims " +
                              std::to_string(dim_) + " and " + std::to_string(i.split.dim) + " (" + where(p) + ")");
      std::pair<int64_t, int64_t> box{i.split.offset, i.shape[dim_]};
      if (std::find(saved_.begin(), saved_.end(), box) != saved_.end()) continue;  // a tied copy
      saved_.push_back(box);
      pieces_.push_back(p);
    }
    if (target_split.split() && target_split.dim != dim_)
      throw CheckpointError("parameter '" + name + "' is cut along dim " + std::to_string(dim_) +
                            " in the checkpoint but along dim " + std::to_string(target_split.dim) +
                            " in the model; a checkpoint moves between tensor-parallel sizes, not between split dims");
    std::vector<std::pair<int64_t, int64_t>> sorted = saved_;
    std::sort(sorted.begin(), sorted.end());
    int64_t covered = 0;
    for (const auto& [offset, size] : sorted)
      if (offset <= covered) covered = std::max(covered, offset + size);
    if (covered < shape[dim_])
      throw CheckpointError("the checkpoint's slices of parameter '" + name + "' cover rows [0, " +
                            std::to_string(covered) + ") of the " + std::to_string(shape[dim_]) + " along dim " +
                            std::to_string(dim_) + " (a tensor-parallel part is missing from " +
                            where(pieces.front()) + "?)");
  }
  if (target_split.split()) {
    ZEAL_CHECK_AS(CheckpointError,
                  target_shape.size() == full_shape_.size() && target_split.offset >= 0 &&
                      target_split.offset + target_shape[dim_] <= full_shape_[dim_],
                  "parameter '", name, "': its slice does not fit its full shape");
    target_offset_ = target_split.offset;
    target_size_ = target_shape[dim_];
  } else {
    target_offset_ = 0;
    target_size_ = shape[dim_];
  }
  run_shape_ = shape;
}

void ParameterSource::read(const std::string& what, int64_t begin, int64_t end, at::Tensor& out) const {
  for (const SliceRun& r : slice_runs(run_shape_, dim_, target_offset_, target_size_, saved_, begin, end)) {
    at::Tensor piece = out.slice(0, r.local_begin, r.local_begin + r.length);
    pieces_[r.piece].reader->read(what, pieces_[r.piece].index, r.saved_begin, r.saved_begin + r.length, piece);
  }
}

void to_fp32(const std::string& checkpoint_dir, const std::string& out_path) {
  to_fp32_parts({checkpoint_dir}, out_path);
}

WholeParameters::WholeParameters(const std::vector<std::string>& dirs) {
  ZEAL_CHECK_AS(CheckpointError, !dirs.empty(), "no checkpoint directory given");
  for (const std::string& d : dirs) readers_.push_back(std::make_unique<CheckpointReader>(d));
  std::map<std::string, std::vector<ParameterSource::Piece>> pieces;
  for (const auto& reader : readers_) {
    const Manifest& m = reader->manifest();
    for (size_t i = 0; i < m.params.size(); ++i) {
      auto [it, fresh] = pieces.try_emplace(m.params[i].name);
      if (fresh) names_.push_back(m.params[i].name);
      it->second.push_back({reader.get(), static_cast<int64_t>(i)});
    }
  }
  const std::vector<std::string> canonical = std::move(names_);
  names_.clear();
  for (const std::string& name : canonical) {
    names_.push_back(name);
    const std::vector<ParameterSource::Piece>& p = pieces.at(name);
    const ParamInfo& first = p.front().reader->manifest().params[p.front().index];
    sources_.emplace_back(name, p, first.full_shape(), TensorSplit{});
    for (const std::string& alias : first.aliases) {  // a tied weight's other names read the same pieces
      if (pieces.count(alias)) continue;
      names_.push_back(alias);
      sources_.emplace_back(alias, p, first.full_shape(), TensorSplit{});
    }
  }
}

at::Tensor WholeParameters::read(size_t i) const {
  at::Tensor out = at::empty({c10::multiply_integers(shape(i))}, at::TensorOptions().dtype(at::kFloat));
  sources_[i].read("master", 0, out.numel(), out);
  return out.view(shape(i));
}

void to_fp32_parts(const std::vector<std::string>& dirs, const std::string& out_path) {
  WholeParameters params(dirs);
  json header = json::object();
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t bytes = c10::multiply_integers(params.shape(i)) * 4;
    header[params.name(i)] = {{"dtype", "F32"}, {"shape", params.shape(i)}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  header["__metadata__"] = {{"format", "pt"}, {"source", "zeal-to-fp32"}};
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string tmp = out_path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw IoError("cannot create " + tmp);
  uint64_t length = text.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((length >> (8 * i)) & 0xff));
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (size_t i = 0; i < params.size(); ++i) {  // one parameter in memory at a time, in offset order
    at::Tensor buffer = params.read(i);
    out.write(static_cast<const char*>(buffer.data_ptr()), static_cast<std::streamsize>(buffer.nbytes()));
  }
  out.close();
  if (!out) throw IoError("writing " + tmp + " failed");
  rename_path(tmp, out_path);
}

}  // namespace zeal::checkpoint
