// Engine::save_checkpoint / load_checkpoint: the engine's state in and out of the checkpoint
// format of checkpoint/checkpoint.h. Loading works at any world size, stage and tensor-parallel
// size: each rank asks for exactly the parameter elements its own fragment table says it owns,
// of its own slice (Note [Moving between tensor-parallel sizes]).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "zeal/checkpoint/checkpoint.h"
#include "zeal/checkpoint/integrity.h"
#include "zeal/checkpoint/publish.h"
#include "zeal/core/error.h"
#include "zeal/core/json.h"
#include "zeal/core/logging.h"
#include "zeal/engine/engine.h"
#include "zeal/parallel/placement.h"

namespace zeal::engine {
namespace fs = std::filesystem;
using json = nlohmann::json;

using checkpoint::agree_or_throw;

namespace {

void check_tag(const std::string& tag) {
  ZEAL_CHECK_AS(CheckpointError, !tag.empty() && tag.find('/') == std::string::npos && tag[0] != '.',
                "checkpoint tag '", tag, "' must be a plain, non-hidden directory name");
}

// <dir>/parts.json (sealed): the parts of a checkpoint in parts, in order, and their layout.
void write_parts_file(const std::string& dir, const std::vector<std::string>& parts, json layout) {
  json doc = {{"format", "zeal-checkpoint-parts"}, {"version", 2}, {"parts", parts}, {"layout", std::move(layout)}};
  checkpoint::write_text_atomically((fs::path(dir) / checkpoint::kPartsName).string(),
                                    checkpoint::seal_json(std::move(doc)));
}

constexpr const char* kLocoLevels = "loco_error_levels";
constexpr const char* kLocoScales = "loco_error_scales";

// Note [LoCo error feedback]: the errors come back when the checkpoint was saved by the same
// layout with LoCo (one unit, the same ranks, the same error sizes); otherwise LoCo starts from zero.
// `whole`: the load reads one checkpoint directory into an engine of one unit.
void restore_loco(Unit& u, checkpoint::CheckpointReader& reader, bool whole, const json& engine, bool optimizer_too) {
  if (!u.reducer || !u.reducer->loco()) return;
  const checkpoint::Manifest& m = reader.manifest();
  std::string why;
  if (!optimizer_too) why = "the optimizer state is not loaded";
  else if (!engine.contains("loco")) why = "it was saved without LoCo";
  else if (u.replicas && u.replicas->rank() != 0)
    why = "with MiCS only the first shard group's errors are saved (each replica's differ)";
  else if (!whole || m.world_size != u.world->size())
    why = whole ? "it was saved on " + std::to_string(m.world_size) + " ranks, this run has " +
                      std::to_string(u.world->size())
                : "it is read in parts or into several units";
  GradReducer::LocoState state;
  if (why.empty()) {
    state.levels = reader.read_rank_tensor(u.world->rank(), kLocoLevels);
    state.scales = reader.read_rank_tensor(u.world->rank(), kLocoScales);
    state.reductions = engine.at("loco").at("reductions").get<int64_t>();
    if (!state.levels.defined() || !state.scales.defined()) why = "its shard holds no LoCo errors";
  }
  if (why.empty() && !u.reducer->restore_loco(state)) why = "its LoCo errors were saved for another layout";
  if (why.empty()) return;
  u.reducer->clear_loco();
  if (u.world->rank() == 0)
    log("engine", LogLevel::kInfo, "LoCo's error feedback starts from zero after loading checkpoint ", reader.dir(),
        ": ", why);
}

}  // namespace

// Note [Checkpoints of several units]: an engine of several units (Note [Sharded-state units]:
// experts and dense weights, say) saves a checkpoint in parts, one per unit and group: the ranks
// of each unit's group save that unit's parameters as one complete checkpoint,
// <tag>/unit<k>_<axes>_<group index>, and parts.json names every part (the first holds world rank
// 0, the module state and the counters). Parameters are looked up by name on load, so a
// checkpoint loads under any unit layout (another expert-parallel size, another ZeRO stage) as
// long as every name is there; expert parameters are saved under their global expert ids
// (zeal.moe), so each appears in exactly one part.
std::string Engine::unit_part_name(size_t k, int group_index) const {
  std::string axes;
  for (const std::string& a : units_[k]->axes) axes += (axes.empty() ? "" : "-") + a;
  return "unit" + std::to_string(k) + "_" + (axes.empty() ? "none" : axes) + "_" + std::to_string(group_index);
}

std::string Engine::save_checkpoint(const std::string& save_dir, const std::string& tag,
                                    const std::string& client_state_json,
                                    const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest) {
  if (units_.size() == 1 && units_[0]->replicas) {
    // Note [MiCS]: the replicas hold the same shards; the first shard group writes the checkpoint
    // and every rank waits for it (and learns whether it failed).
    Unit& u = *units_[0];
    std::string dir, error;
    if (u.replicas->rank() == 0) {
      try {
        dir = save_unit(u, save_dir, tag, client_state_json, extra, save_latest);
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    agree_or_throw(*mesh_->group(mesh_->mesh().other_axes({})), error, "checkpoint save");
    return dir.empty() ? (fs::path(save_dir) / tag).string() : dir;
  }
  if (units_.size() == 1) return save_unit(*units_[0], save_dir, tag, client_state_json, extra, save_latest);
  ZEAL_CHECK(!save_dir.empty(), "save_checkpoint: save_dir is empty; name the directory to save into");
  check_tag(tag);
  const parallel::Mesh& mesh = mesh_->mesh();
  std::vector<std::string> parts;
  json units = json::array();
  for (size_t k = 0; k < units_.size(); ++k) {
    const int groups = static_cast<int>(mesh.groups(units_[k]->axes).size());
    for (int g = 0; g < groups; ++g) parts.push_back(unit_part_name(k, g));
    units.push_back({{"axes", units_[k]->axes}, {"groups", groups}});
  }
  // Parameters split over a batch axis (an expert, a sequence-split weight) hold different values
  // on that axis's ranks: each needs its own name, or the parts could not be told apart on load.
  for (const auto& unit : units_) {
    std::vector<std::string> split;
    for (const parallel::Mesh::Axis& a : mesh.axes())
      if (a.size > 1 && std::count(parallel::batch_axes().begin(), parallel::batch_axes().end(), a.name) &&
          !std::count(unit->axes.begin(), unit->axes.end(), a.name))
        split.push_back(a.name);
    std::string names;
    for (size_t i : unit->members)
      if (!splits_[i].split()) names += names_[i] + "\n";
    if (split.empty() || names.empty()) continue;
    const comm::CommunicatorPtr& group = mesh_->group(split);
    at::Tensor mine = at::full({1}, static_cast<int64_t>(std::hash<std::string>{}(names)), at::kLong);
    at::Tensor every = at::empty({group->size()}, at::kLong);
    group->all_gather(every, mine, {})->wait();
    const int64_t* h = every.data_ptr<int64_t>();
    const std::set<int64_t> distinct(h, h + group->size());
    ZEAL_CHECK_AS(CheckpointError, static_cast<int>(distinct.size()) == group->size(), "save_checkpoint: parameter '",
                  names_[unit->members.front()], "' is split over ", mesh.key(split),
                  " (each of its ranks holds its own value) but goes by the same name on each, so a checkpoint could "
                  "not tell them apart; give each rank's parameter its own name (zeal.moe names experts by global "
                  "id)");
  }
  checkpoint::AtomicSave save(mesh_->group(mesh.other_axes({})), save_dir, tag);
  save.write("writing units", true, [&] {
    for (size_t k = 0; k < units_.size(); ++k)
      save_unit(*units_[k], save.tmp_dir(), unit_part_name(k, mesh.group_index(units_[k]->axes, mesh_->rank())),
                client_state_json, extra, /*save_latest=*/false);
  });
  save.publish(save_latest, [&] {
    write_parts_file(save.tmp_dir(), parts, {{"mesh", mesh.describe()}, {"units", units}});
  });
  log("engine", LogLevel::kInfo, "saved checkpoint ", save.final_dir(), " in ", parts.size(), " parts (step ",
      global_steps_, ")");
  return save.final_dir();
}

std::string Engine::save_unit(Unit& u, const std::string& save_dir, const std::string& tag,
                              const std::string& client_state_json,
                              const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest) {
  ZEAL_CHECK(!save_dir.empty(), "save_checkpoint: save_dir is empty; name the directory to save into");
  check_tag(tag);
  json client;
  JsonProblem problem;
  ZEAL_CHECK_AS(CheckpointError, parse_json(client_state_json, client, problem), "client_state cannot be saved: ",
                problem.describe());
  // One identity for the whole save, in every shard (Note [Checkpoint integrity]).
  at::Tensor id = at::zeros({32}, at::TensorOptions().dtype(at::kByte));
  if (u.world->rank() == 0) {
    std::string fresh = checkpoint::new_save_id();
    std::memcpy(id.data_ptr(), fresh.data(), 32);
  }
  if (u.world->size() > 1) u.world->broadcast(id, {0})->wait();
  const std::string save_id(static_cast<const char*>(id.data_ptr()), 32);
  const int rank = u.world->rank();
  checkpoint::AtomicSave save(u.world, save_dir, tag);  // Note [Atomic checkpoints]
  const std::string& tmp_dir = save.tmp_dir();
  const std::string& final_dir = save.final_dir();

  GradReducer::LocoState loco;
  if (u.reducer && u.reducer->loco()) loco = u.reducer->loco_state();
  // Each rank writes its own shard; below stage 1 every rank holds everything, so rank 0 alone does.
  save.write("writing shards", partitioned_ || rank == 0, [&] {
    struct Release {  // NVMe offload: the swapped state in host memory only while it is written
      Unit* unit;
      ~Release() {
        if (unit) unit->store->release(*unit->optimizer, false);
      }
    } release{u.store->swapper() ? &u : nullptr};
    if (u.store->swapper()) u.store->materialize(*u.optimizer);
    std::vector<std::pair<std::string, at::Tensor>> tensors{{"master", u.store->master()}};
    for (const std::string& name : u.optimizer->state_names()) tensors.push_back({name, u.optimizer->state(name)});
    if (loco.levels.defined()) {  // Note [LoCo error feedback]: this rank's own errors
      tensors.push_back({kLocoLevels, loco.levels});
      tensors.push_back({kLocoScales, loco.scales});
    }
    auto progress = [this](const std::string& point) {
      if (fault_hook_ && point == "half") fault_hook_("shard_half");
    };
    checkpoint::write_safetensors((fs::path(tmp_dir) / checkpoint::shard_file_name(rank)).string(), tensors,
                                  checkpoint::shard_metadata(save_id, tag, rank, u.world->size()), progress);
  });

  auto seal = [&] {
    checkpoint::Manifest m;
    m.save_id = save_id;
    m.part = tag;
    m.stage = stage_;
    m.world_size = u.world->size();
    m.model_dtype = c10::toString(model_dtype_);
    m.optimizer = u.optimizer->name();
    m.state_names = u.optimizer->state_names();
    for (size_t j = 0; j < u.members.size(); ++j) {
      const size_t i = u.members[j];
      m.params.push_back({names_[i], shapes_[i], u.layout.numels[j], splits_[i], aliases_[i]});
    }
    for (int r = 0; r < u.world->size(); ++r) {
      m.fragments.push_back(partitioned_ || r == 0 ? zero::fragments(u.layout, u.layout.owned(r, partitioned_))
                                                   : std::vector<zero::Fragment>{});
      m.shard_seals.push_back(m.fragments.back().empty() ? checkpoint::FileSeal{}
                                                         : checkpoint::seal_of((fs::path(tmp_dir) /
                                                                                checkpoint::shard_file_name(r)).string()));
    }
    optim::LossScaler::State s = precision_.scaler().state();
    json engine = {{"global_steps", global_steps_},
                   {"global_samples", global_samples_},
                   {"micro_steps", micro_steps_},
                   {"skipped_steps", skipped_steps_},
                   {"scheduler_iteration", scheduler_iteration_},
                   {"optimizer_steps", u.optimizer->steps_taken()},
                   {"optimizer_scalars", u.optimizer->scalars()},
                   {"lr", get_lr()},
                   {"loss_scaler",
                    {{"scale", s.scale},
                     {"current_hysteresis", s.current_hysteresis},
                     {"iteration", s.iteration},
                     {"last_overflow_iteration", s.last_overflow_iteration}}}};
    if (loco.levels.defined())
      engine["loco"] = {{"reductions", loco.reductions}, {"levels", loco.levels.numel()},
                        {"scales", loco.scales.numel()}};
    m.engine_state = engine.dump();
    m.client_state = client.dump();
    const std::string extra_path = (fs::path(tmp_dir) / checkpoint::kExtraName).string();
    checkpoint::write_safetensors(extra_path, extra, checkpoint::shard_metadata(save_id, tag, 0, u.world->size()));
    m.extra_seal = checkpoint::seal_of(extra_path);
    checkpoint::write_manifest((fs::path(tmp_dir) / checkpoint::kManifestName).string(), m);
  };
  save.publish(save_latest, seal, [this] {
    if (fault_hook_) fault_hook_("before_publish");
  });
  if (units_.size() == 1)
    log("engine", LogLevel::kInfo, "saved checkpoint ", final_dir, " (step ", global_steps_, ")");
  return final_dir;
}

std::string Engine::save_checkpoint_part(const comm::CommunicatorPtr& everyone, const std::string& save_dir,
                                         const std::string& tag, const std::string& part,
                                         const std::vector<std::string>& parts, const std::string& layout_json,
                                         const std::string& client_state_json,
                                         const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest) {
  ZEAL_CHECK(everyone, "save_checkpoint_part needs the communicator of every part's ranks");
  only_unit("save_checkpoint_part");  // a part of one unit (pipeline stages and tensor ranks are parts already)
  check_tag(tag);
  json layout;
  JsonProblem problem;
  ZEAL_CHECK(parse_json(layout_json, layout, problem), "save_checkpoint_part: layout: ", problem.describe());
  // The same protocol one level up (Note [Atomic checkpoints]): every part is itself a complete,
  // published checkpoint inside the temporary directory before the whole is renamed.
  checkpoint::AtomicSave save(everyone, save_dir, tag);
  save.write("writing part " + part, true, [&] {
    save_checkpoint(save.tmp_dir(), part, client_state_json, extra, /*save_latest=*/false);
  });
  save.publish(save_latest, [&] { write_parts_file(save.tmp_dir(), parts, std::move(layout)); });
  return save.final_dir();
}

std::pair<std::string, std::string> Engine::load_checkpoint(const std::string& load_dir, const std::string& tag,
                                                            bool load_optimizer_states, bool load_lr_scheduler_states,
                                                            bool load_module_only) {
  return load_parts([&] { return std::vector<std::string>{checkpoint::resolve_tag(load_dir, tag)}; },
                    load_optimizer_states, load_lr_scheduler_states, load_module_only);
}

std::pair<std::string, std::string> Engine::load_checkpoint_parts(const std::vector<std::string>& dirs,
                                                                  bool load_optimizer_states,
                                                                  bool load_lr_scheduler_states,
                                                                  bool load_module_only) {
  return load_parts([&] { return dirs; }, load_optimizer_states, load_lr_scheduler_states, load_module_only);
}

std::pair<std::string, std::string> Engine::load_parts(const std::function<std::vector<std::string>()>& locate,
                                                       bool load_optimizer_states, bool load_lr_scheduler_states,
                                                       bool load_module_only) {
  // Any rank's failure fails every rank at once (no rank is left waiting in a collective).
  std::string error;
  std::pair<std::string, std::string> result;
  try {
    for (auto& u : units_)  // NVMe offload: loaded into host memory, then swapped out
      if (u->store->swapper()) u->store->materialize(*u->optimizer);
    result = load_checkpoint_local(locate(), load_optimizer_states, load_lr_scheduler_states, load_module_only);
  } catch (const std::exception& e) {
    error = e.what();
  }
  for (auto& u : units_)
    if (!error.empty() && u->store->swapper() && u->store->master().defined())
      u->store->release(*u->optimizer, false);  // the swap files are untouched
  agree_or_throw(units_.size() == 1 && !units_[0]->replicas ? *units_[0]->world
                                                             : *mesh_->group(mesh_->mesh().other_axes({})),
                 error, "checkpoint load");
  for (auto& u : units_) {
    u->publish(u->store->master());
    if (u->store->swapper()) u->store->release(*u->optimizer, true);
    // The compressed optimizers' error buffers are not saved: they start from zero after a load, as
    // DeepSpeed's do (each rank's differ, and they would tie the checkpoint to its world size).
    u->onebit_state.reset();
    if (u->store->master().defined()) u->optimizer->state_loaded(u->store->master());
  }
  zero_grad();
  log("engine", LogLevel::kInfo, "loaded checkpoint ", result.first, " (step ", global_steps_, ")");
  return result;
}

std::pair<std::string, std::string> Engine::load_checkpoint_local(const std::vector<std::string>& dirs,
                                                                  bool load_optimizer_states,
                                                                  bool load_lr_scheduler_states,
                                                                  bool load_module_only) {
  // One checkpoint directory, or several parts of one (pipeline stages, each saved by its own
  // engine): every parameter is looked up by name in the parts in order; the first part holds the
  // counters every part shares.
  ZEAL_CHECK_AS(CheckpointError, !dirs.empty(), "load_checkpoint: no checkpoint directory given");
  std::vector<std::unique_ptr<checkpoint::CheckpointReader>> readers;
  for (const std::string& d : dirs) readers.push_back(std::make_unique<checkpoint::CheckpointReader>(d));
  const std::string dir = dirs.front();
  const checkpoint::Manifest& m = readers.front()->manifest();

  // Every saved copy of each parameter by name, across the parts (a tensor-parallel parameter's
  // slices are in several); ParameterSource checks the shapes and reads this rank's slice.
  std::vector<checkpoint::ParameterSource> sources;
  for (size_t i = 0; i < params_.size(); ++i) {
    std::vector<checkpoint::ParameterSource::Piece> pieces;
    for (const auto& reader : readers) {
      int64_t s = reader->find_param(names_[i]);
      if (s < 0) continue;
      const checkpoint::Manifest& mr = reader->manifest();
      ZEAL_CHECK_AS(CheckpointError, mr.optimizer == m.optimizer && mr.state_names == m.state_names, "checkpoint ",
                    reader->dir(), " holds ", mr.optimizer, " state and ", dir, " ", m.optimizer,
                    ": the parts do not belong together");
      pieces.push_back({reader.get(), s});
    }
    const std::string where = dirs.size() == 1 ? "checkpoint " + dir : "the " + std::to_string(dirs.size()) +
                                                                          " parts of checkpoint " + dir + " ...";
    ZEAL_CHECK_AS(CheckpointError, !pieces.empty(), where, " has no parameter '", names_[i], "' (", m.params.size(),
                  " parameters in its first part; is it from another model?)");
    sources.emplace_back(names_[i], pieces, shapes_[i], splits_[i]);
  }
  const bool optimizer_too = load_optimizer_states && !load_module_only;
  json engine = json::parse(m.engine_state);
  for (auto& unit : units_) {
    Unit& u = *unit;
    if (optimizer_too)
      ZEAL_CHECK_AS(CheckpointError, m.optimizer == u.optimizer->name(), "checkpoint ", dir, " holds ", m.optimizer,
                    " state but the config's optimizer is ", u.optimizer->name(),
                    "; pass load_optimizer_states=False to load the weights only");
    // This rank's elements under the current layout, whatever layout wrote them.
    const std::vector<zero::Fragment> mine = zero::fragments(u.layout, u.owned);
    auto fill = [&](const std::string& what, at::Tensor& target) {
      for (const zero::Fragment& f : mine) {
        at::Tensor piece = target.slice(0, f.local, f.local + (f.end - f.begin));
        const checkpoint::ParameterSource& source = sources[u.members[f.param]];
        if (piece.is_contiguous() && piece.device().is_cpu()) {
          source.read(what, f.begin, f.end, piece);
        } else {
          at::Tensor host = at::empty({f.end - f.begin}, at::TensorOptions().dtype(at::kFloat));
          source.read(what, f.begin, f.end, host);
          piece.copy_(host);
        }
      }
    };
    fill("master", u.store->master());
    if (optimizer_too) {
      // The model-dtype weights follow from the master weights (publish_parameters, by the caller).
      for (const std::string& name : m.state_names) fill(name, u.optimizer->state(name));
      u.optimizer->set_steps_taken(engine.at("optimizer_steps").get<int64_t>());
      if (engine.contains("optimizer_scalars"))
        u.optimizer->restore_scalars(engine.at("optimizer_scalars").get<std::map<std::string, std::vector<double>>>());
    }
  }
  for (auto& unit : units_)
    restore_loco(*unit, *readers.front(), dirs.size() == 1 && units_.size() == 1, engine, optimizer_too);
  if (optimizer_too) {
    const json& s = engine.at("loss_scaler");
    precision_.scaler().restore({s.at("scale").get<double>(), s.at("current_hysteresis").get<int64_t>(),
                     s.at("iteration").get<int64_t>(), s.at("last_overflow_iteration").get<int64_t>()});
  }
  if (!load_module_only) {
    global_steps_ = engine.at("global_steps").get<int64_t>();
    global_samples_ = engine.at("global_samples").get<int64_t>();
    micro_steps_ = engine.at("micro_steps").get<int64_t>();
    skipped_steps_ = engine.at("skipped_steps").get<int64_t>();
    last_log_samples_ = global_samples_;
  }
  if (load_lr_scheduler_states && !load_module_only) {
    scheduler_iteration_ = engine.at("scheduler_iteration").get<int64_t>();
    apply_lr(scheduler_iteration_);
  }
  log("engine", LogLevel::kDebug, "read checkpoint ", dir, " (saved at stage ", m.stage, " on ", m.world_size,
      " ranks)");
  return {dir, m.client_state};
}

}  // namespace zeal::engine
