#include "zeal/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include "zeal/core/error.h"

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

void write_manifest(const std::string& path, const Manifest& m) {
  json params = json::array();
  for (const ParamInfo& p : m.params) params.push_back({{"name", p.name}, {"shape", p.shape}, {"numel", p.numel}});
  json ranks = json::array();
  for (const auto& frags : m.fragments) {
    json list = json::array();
    for (const zero::Fragment& f : frags) list.push_back({f.param, f.begin, f.end, f.local});
    ranks.push_back({{"file", frags.empty() ? "" : shard_file_name(static_cast<int>(ranks.size()))},
                     {"fragments", list}});
  }
  json doc = {{"format", kFormat},
              {"version", kVersion},
              {"zero_stage", m.stage},
              {"world_size", m.world_size},
              {"model_dtype", m.model_dtype},
              {"optimizer", m.optimizer},
              {"optimizer_state", m.state_names},
              {"parameters", params},
              {"fragment_columns", {"param", "begin", "end", "local"}},
              {"ranks", ranks},
              {"engine", json::parse(m.engine_state)},
              {"client_state", json::parse(m.client_state)}};
  write_text_atomically(path, doc.dump(1));
}

Manifest read_manifest(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw CheckpointError("no checkpoint manifest at " + path + " (not a Zeal checkpoint, or an incomplete save)");
  std::stringstream text;
  text << in.rdbuf();
  json doc = json::parse(text.str(), nullptr, false);
  auto bad = [&](const std::string& what) -> CheckpointError {
    return CheckpointError("checkpoint manifest " + path + " is invalid: " + what);
  };
  if (!doc.is_object()) throw bad("not a JSON object (corrupted?)");
  if (doc.value("format", "") != kFormat) throw bad("format is not '" + std::string(kFormat) + "'");
  if (doc.value("version", 0) != kVersion)
    throw bad("format version " + std::to_string(doc.value("version", 0)) + ", this Zeal reads version " +
              std::to_string(kVersion));
  Manifest m;
  try {
    m.stage = doc.at("zero_stage").get<int64_t>();
    m.world_size = doc.at("world_size").get<int64_t>();
    m.model_dtype = doc.at("model_dtype").get<std::string>();
    m.optimizer = doc.at("optimizer").get<std::string>();
    m.state_names = doc.at("optimizer_state").get<std::vector<std::string>>();
    for (const json& p : doc.at("parameters"))
      m.params.push_back({p.at("name").get<std::string>(), p.at("shape").get<std::vector<int64_t>>(),
                          p.at("numel").get<int64_t>()});
    for (const json& r : doc.at("ranks")) {
      std::vector<zero::Fragment> frags;
      for (const json& f : r.at("fragments")) {
        zero::Fragment fr{f.at(0).get<int64_t>(), f.at(1).get<int64_t>(), f.at(2).get<int64_t>(), f.at(3).get<int64_t>()};
        if (fr.param < 0 || fr.param >= static_cast<int64_t>(m.params.size()) || fr.begin < 0 || fr.end <= fr.begin ||
            fr.end > m.params[fr.param].numel || fr.local < 0)
          throw bad("a fragment of rank " + std::to_string(m.fragments.size()) + " is out of range");
        frags.push_back(fr);
      }
      m.fragments.push_back(std::move(frags));
    }
    m.engine_state = doc.at("engine").dump();
    m.client_state = doc.at("client_state").dump();
  } catch (const json::exception& e) {
    throw bad(e.what());
  }
  if (static_cast<int64_t>(m.fragments.size()) != m.world_size)
    throw bad("lists " + std::to_string(m.fragments.size()) + " ranks for a world of " + std::to_string(m.world_size));
  // Every element of every parameter must be held by some rank.
  std::vector<int64_t> covered(m.params.size(), 0);
  for (const auto& frags : m.fragments)
    for (const zero::Fragment& f : frags) covered[f.param] += f.end - f.begin;
  for (size_t p = 0; p < m.params.size(); ++p)
    if (covered[p] < m.params[p].numel)
      throw bad("parameter '" + m.params[p].name + "' is only partly covered by the fragment table");
  return m;
}

std::string resolve_tag(const std::string& save_dir, const std::string& tag) {
  if (!tag.empty()) return (fs::path(save_dir) / tag).string();
  std::ifstream in(fs::path(save_dir) / "latest");
  if (!in) throw CheckpointError("no 'latest' file in " + save_dir + ": no complete checkpoint was saved there; pass a tag");
  std::string name;
  std::getline(in, name);
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  if (name.empty()) throw CheckpointError(save_dir + "/latest is empty");
  return (fs::path(save_dir) / name).string();
}

CheckpointReader::CheckpointReader(std::string dir) : dir_(std::move(dir)) {
  manifest_ = read_manifest((fs::path(dir_) / kManifestName).string());
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

SafetensorsReader& CheckpointReader::shard(size_t rank) {
  if (!shards_[rank]) {
    auto reader = std::make_unique<SafetensorsReader>((fs::path(dir_) / shard_file_name(static_cast<int>(rank))).string());
    auto it = reader->metadata().find("rank");
    if (it == reader->metadata().end() || it->second != std::to_string(rank))
      throw CheckpointError(dir_ + "/" + shard_file_name(static_cast<int>(rank)) + " does not belong to rank " +
                            std::to_string(rank) + " of this checkpoint (mixed-up files?)");
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

void to_fp32(const std::string& checkpoint_dir, const std::string& out_path) {
  to_fp32_parts({checkpoint_dir}, out_path);
}

void to_fp32_parts(const std::vector<std::string>& dirs, const std::string& out_path) {
  ZEAL_CHECK_AS(CheckpointError, !dirs.empty(), "zeal-to-fp32: no checkpoint directory given");
  // Every parameter once, from the first part that holds it (a tied module is in several).
  std::vector<std::unique_ptr<CheckpointReader>> readers;
  for (const std::string& d : dirs) readers.push_back(std::make_unique<CheckpointReader>(d));
  struct Entry {
    size_t reader;
    int64_t index;
  };
  std::vector<Entry> entries;
  std::set<std::string> seen;
  json header = json::object();
  int64_t offset = 0;
  for (size_t r = 0; r < readers.size(); ++r) {
    const Manifest& m = readers[r]->manifest();
    for (size_t i = 0; i < m.params.size(); ++i) {
      const ParamInfo& p = m.params[i];
      if (!seen.insert(p.name).second) continue;
      header[p.name] = {{"dtype", "F32"}, {"shape", p.shape}, {"data_offsets", {offset, offset + p.numel * 4}}};
      offset += p.numel * 4;
      entries.push_back({r, static_cast<int64_t>(i)});
    }
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
  for (const Entry& e : entries) {  // one parameter in memory at a time, in header order
    const ParamInfo& p = readers[e.reader]->manifest().params[e.index];
    at::Tensor buffer = at::empty({p.numel}, at::TensorOptions().dtype(at::kFloat));
    readers[e.reader]->read("master", e.index, 0, p.numel, buffer);
    out.write(static_cast<const char*>(buffer.data_ptr()), static_cast<std::streamsize>(buffer.nbytes()));
  }
  out.close();
  if (!out) throw IoError("writing " + tmp + " failed");
  rename_path(tmp, out_path);
}

}  // namespace zeal::checkpoint
