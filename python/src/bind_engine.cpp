// Layer engine: the Engine and the user's optimizer adapted to it.
#include "bindings.h"

#include "zeal/core/config.h"
#include "zeal/core/error.h"
#include "zeal/comm/world.h"
#include "zeal/engine/engine.h"
#include "zeal/optim/client_optimizer.h"
#include "zeal/parallel/process_groups.h"

namespace zeal::bindings {
namespace {

std::vector<engine::ParamGroupSpec> to_groups(const py::list& groups) {
  std::vector<engine::ParamGroupSpec> out;
  for (const auto& item : groups) {
    auto group = item.cast<py::dict>();
    engine::ParamGroupSpec spec;
    spec.params = group["params"].cast<std::vector<at::Tensor>>();
    if (group.contains("lr")) spec.lr = group["lr"].cast<double>();
    if (group.contains("weight_decay")) spec.weight_decay = group["weight_decay"].cast<double>();
    if (group.contains("betas")) spec.betas = group["betas"].cast<std::array<double, 2>>();
    if (group.contains("eps")) spec.eps = group["eps"].cast<double>();
    if (group.contains("names")) spec.names = group["names"].cast<std::vector<std::string>>();
    if (group.contains("aliases")) spec.aliases = group["aliases"].cast<std::vector<std::vector<std::string>>>();
    if (group.contains("splits")) {
      for (const auto& item : group["splits"].cast<py::list>()) {
        checkpoint::TensorSplit split;
        if (!item.is_none()) {
          auto d = item.cast<py::dict>();
          split = {d["dim"].cast<int64_t>(), d["offset"].cast<int64_t>(), d["full_shape"].cast<std::vector<int64_t>>()};
        }
        spec.splits.push_back(std::move(split));
      }
    }
    if (group.contains("placements")) {
      for (const auto& item : group["placements"].cast<py::list>()) {
        parallel::Placement placement;
        if (!item.is_none()) {
          auto d = item.cast<py::dict>();
          if (d.contains("split")) placement.split = d["split"].cast<std::vector<std::string>>();
          if (d.contains("tied_stages")) placement.tied_stages = d["tied_stages"].cast<std::vector<int>>();
        }
        spec.placements.push_back(std::move(placement));
      }
    }
    if (group.contains("full_shapes")) spec.full_shapes = group["full_shapes"].cast<std::vector<std::vector<int64_t>>>();
    if (group.contains("chunks")) {
      for (const auto& c : group["chunks"].cast<py::list>())
        spec.chunks.push_back(c.is_none() ? at::Tensor() : c.cast<at::Tensor>());
    }
    out.push_back(std::move(spec));
  }
  return out;
}

void need_stage3(const engine::Engine& e) {
  if (e.stage() != 3) throw Error("this operation needs ZeRO stage 3; the engine runs stage " + std::to_string(e.stage()));
}

// The one partition of a one-unit engine (stage 3).
zero::ParamPartition* stage3(engine::Engine& e) {
  need_stage3(e);
  zero::ParamPartition* p = e.partition();
  if (!p) throw Error("this operation covers the parameters of one reduction group; this engine's reduce over " +
                      std::to_string(e.units().size()));
  return p;
}

// Stage 3, parameter i (an engine index): its unit's partition and its index there (Note [Sharded-state units]).
std::pair<zero::ParamPartition*, size_t> stage3_param(engine::Engine& e, size_t i) { return e.stage3_slot(i); }

// Engine indices split by unit, each list in the given order, in unit order.
std::vector<std::pair<zero::ParamPartition*, std::vector<size_t>>> stage3_by_unit(engine::Engine& e,
                                                                                   const std::vector<size_t>& indices) {
  std::vector<std::pair<zero::ParamPartition*, std::vector<size_t>>> out;
  for (const auto& u : e.units()) out.push_back({u->partition.get(), {}});
  for (size_t i : indices) {
    auto [p, j] = stage3_param(e, i);
    for (auto& entry : out)
      if (entry.first == p) entry.second.push_back(j);
  }
  return out;
}


// The user's optimizer (python/zeal/client_optim.py adapts a torch.optim.Optimizer to these calls).
// The engine calls them from its step with the GIL released: each takes the GIL, and the Python
// object is held through a shared_ptr whose deleter takes it too, so copies never touch refcounts.
std::unique_ptr<optim::Optimizer> client_optimizer(const py::object& adapter) {
  if (adapter.is_none()) return nullptr;
  std::shared_ptr<py::object> held(new py::object(adapter), [](py::object* o) {
    py::gil_scoped_acquire gil;
    delete o;
  });
  optim::ClientCallbacks c;
  c.name = py::str(adapter.attr("name"));
  c.update = [held](at::Tensor& params, const at::Tensor& grads, const std::vector<optim::ParamGroup>&) {
    py::gil_scoped_acquire gil;
    held->attr("update")(params, grads);
  };
  c.state_names = [held] {
    py::gil_scoped_acquire gil;
    return held->attr("state_names")().cast<std::vector<std::string>>();
  };
  c.state = [held](const std::string& name) {
    py::gil_scoped_acquire gil;
    return held->attr("state")(name).cast<at::Tensor>();
  };
  c.scalars = [held] {
    py::gil_scoped_acquire gil;
    return held->attr("scalars")().cast<std::map<std::string, std::vector<double>>>();
  };
  c.restore_scalars = [held](const std::map<std::string, std::vector<double>>& saved) {
    py::gil_scoped_acquire gil;
    held->attr("restore_scalars")(saved);
  };
  return std::make_unique<optim::ClientOptimizer>(std::move(c));
}

std::unique_ptr<engine::Engine> make_engine(const py::list& groups, Config config,
                                            std::shared_ptr<parallel::ProcessGroups> mesh, const py::object& client) {
  auto specs = to_groups(groups);
  auto optimizer = client_optimizer(client);
  comm::set_default_timeout(to_timeout(config.comms_timeout_s));  // every MPI group, whenever cut (Note [One comms timeout])
  // Construction runs collectives; other threads may need the GIL meanwhile.
  py::gil_scoped_release nogil;
  if (!mesh) return std::make_unique<engine::Engine>(std::move(specs), std::move(config), comm::world(), std::move(optimizer));
  return std::make_unique<engine::Engine>(std::move(specs), std::move(config), std::move(mesh), std::move(optimizer));
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<engine::Engine>(m, "Engine")
      .def(py::init([](const py::list& groups, const std::string& config_json,
                       std::shared_ptr<parallel::ProcessGroups> mesh) {
             return make_engine(groups, Config::from_string(config_json), std::move(mesh), py::none());
           }),
           py::arg("param_groups"), py::arg("config_json"), py::arg("mesh") = nullptr)
      .def(py::init(&make_engine), py::arg("param_groups"), py::arg("config"), py::arg("mesh") = nullptr,
           py::arg("client_optimizer") = py::none())

      .def("backward", &engine::Engine::backward, py::arg("loss"), py::arg("retain_graph") = false,
           py::arg("scale_wrt_gas") = true, py::call_guard<py::gil_scoped_release>())
      .def("full_value", &engine::Engine::full_value, py::arg("index"), py::arg("what"),
           py::call_guard<py::gil_scoped_release>())
      .def("set_full_value", &engine::Engine::set_full_value, py::arg("index"), py::arg("what"), py::arg("value"),
           py::call_guard<py::gil_scoped_release>())
      .def("backward_from", &engine::Engine::backward_from, py::arg("outputs"), py::arg("output_grads"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("mesh", &engine::Engine::mesh)
      .def_property_readonly("reduction_axes", &engine::Engine::reduction_axes)
      // The sharded-state units (Note [Sharded-state units]): (reduction axes, group size, engine
      // indices of their parameters), in unit order.
      .def_property_readonly("units",
                             [](const engine::Engine& e) {
                               py::list out;
                               for (const auto& u : e.units())
                                 out.append(py::make_tuple(u->axes, u->world->size(), u->members));
                               return out;
                             })
      .def("set_boundary_override", &engine::Engine::set_boundary_override, py::arg("boundary"))
      .def("set_backwards_per_step", &engine::Engine::set_backwards_per_step, py::arg("n"))
      .def("step", &engine::Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("zero_grad", &engine::Engine::zero_grad)
      .def("is_gradient_accumulation_boundary", &engine::Engine::is_gradient_accumulation_boundary)
      .def("get_lr", &engine::Engine::get_lr)
      .def("set_lr", &engine::Engine::set_lr, py::arg("lrs"))
      .def("get_mom", &engine::Engine::get_mom)
      .def_property_readonly("cycles_momentum", &engine::Engine::cycles_momentum)
      .def("get_betas", [](const engine::Engine& e) {
        std::vector<std::pair<double, double>> out;
        for (const auto& b : e.group_betas()) out.push_back({b[0], b[1]});
        return out;
      })
      .def("segments", &engine::Engine::segments)
      .def_property_readonly("optimizer_name", [](engine::Engine& e) { return std::string(e.optimizer().name()); })
      .def_property_readonly("optimizer_steps", [](engine::Engine& e) { return e.optimizer().steps_taken(); })
      .def("optimizer_state_names", [](engine::Engine& e) { return e.optimizer().state_names(); })
      .def("optimizer_state", [](engine::Engine& e, const std::string& name) {
        ZEAL_CHECK(e.units().size() == 1, "optimizer_state covers one reduction group's shard; this engine's "
                   "parameters reduce over ", e.units().size());
        ZEAL_CHECK(!e.units().front()->store->swapper(), "the optimizer state of this engine lives in NVMe swap files");
        return e.optimizer().state(name);  // this rank's elements, sharing storage
      }, py::arg("name"))
      .def("add_forward_time", &engine::Engine::add_forward_time)
      .def_property_readonly("last_step_record", [](const engine::Engine& e) {
        const auto& r = e.last_step_record();
        return py::dict(py::arg("loss") = r.loss, py::arg("losses") = r.losses, py::arg("forward_ms") = r.forward_ms,
                        py::arg("backward_ms") = r.backward_ms, py::arg("step_ms") = r.step_ms);
      })
      .def_property_readonly("global_steps", &engine::Engine::global_steps)
      .def_property_readonly("global_samples", &engine::Engine::global_samples)
      .def_property_readonly("micro_steps", &engine::Engine::micro_steps)
      .def_property_readonly("skipped_steps", &engine::Engine::skipped_steps)
      .def_property_readonly("loss_scale", &engine::Engine::loss_scale)
      .def_property_readonly("dynamic_loss_scale", &engine::Engine::dynamic_loss_scale)
      .def_property_readonly("last_step_overflow", &engine::Engine::last_step_overflow)
      .def_property_readonly("last_grad_norm", &engine::Engine::last_grad_norm)
      .def_property_readonly("computes_grad_norm", &engine::Engine::computes_grad_norm)
      .def_property_readonly("num_buckets", &engine::Engine::num_buckets)
      .def_property_readonly("zero_stage", &engine::Engine::stage)
      .def_property_readonly("flat_numel", &engine::Engine::flat_numel)
      .def_property_readonly("master_numel", &engine::Engine::master_numel)
      .def_property_readonly("master_device", &engine::Engine::master_location)
      .def_property_readonly("comms_counts", [](const engine::Engine& e) {
        py::dict d;
        for (const auto& [op, c] : e.comms_counts()) {
          py::dict entry;
          entry["calls"] = c.calls;
          entry["bytes"] = c.bytes;
          entry["intra_node_bytes"] = c.intra_node_bytes;
          entry["inter_node_bytes"] = c.inter_node_bytes;
          d[py::str(op)] = entry;
        }
        return d;
      })
      .def_property_readonly("skipped_comm_rounds", &engine::Engine::skipped_comm_rounds)
      .def_property_readonly("grad_shard_numel", &engine::Engine::grad_shard_numel)
      .def_property_readonly("model_dtype", [](const engine::Engine& e) { return std::string(c10::toString(e.model_dtype())); })
      .def_property_readonly("config", [](const engine::Engine& e) { return e.config(); }, "The parsed config (a copy).")
      .def_property_readonly("train_batch_size", [](const engine::Engine& e) { return e.batch().train_batch_size; })
      .def_property_readonly("train_micro_batch_size_per_gpu", [](const engine::Engine& e) { return e.batch().micro_batch_size; })
      .def_property_readonly("gradient_accumulation_steps", [](const engine::Engine& e) { return e.batch().gradient_accumulation_steps; })
      .def_property_readonly("steps_per_print", [](const engine::Engine& e) { return e.config().steps_per_print; })
      .def_property_readonly("wall_clock_breakdown", [](const engine::Engine& e) { return e.config().wall_clock_breakdown; })
      .def_property_readonly("state_bytes", [](const engine::Engine& e) {
        py::dict d;
        for (const auto& [role, n] : e.state_bytes()) d[py::str(role)] = n;
        return d;
      })
      .def_property_readonly("parameters", &engine::Engine::parameters)
      .def_property_readonly("parameter_names", &engine::Engine::parameter_names)
      // Stage 3: the frozen parameters it partitions, engine indices len(parameters) and up.
      .def_property_readonly("frozen_parameters", &engine::Engine::frozen_parameters)
      .def_property_readonly("frozen_parameter_names", &engine::Engine::frozen_parameter_names)
      .def_property_readonly("frozen_parameter_shapes", &engine::Engine::frozen_parameter_shapes)
      .def("is_frozen", [](engine::Engine& e, size_t i) { return i >= e.parameters().size(); })
      .def_property_readonly("parameter_shapes", &engine::Engine::parameter_shapes)
      .def_property_readonly("zero3_settings", [](const engine::Engine& e) {
        const ZeroConfig& z = e.config().zero_optimization;
        py::dict d;
        d["prefetch_bucket_size"] = z.prefetch_bucket_size;
        d["max_live_parameters"] = z.max_live_parameters;
        d["max_reuse_distance"] = z.max_reuse_distance;
        d["param_persistence_threshold"] = z.param_persistence_threshold;
        return d;
      })
      // Stage 3: gather / release parameters by engine index (python/zeal/zero.py drives these); each
      // unit's partition gathers its own parameters over its own group.
      .def("fetch_params",
           [](engine::Engine& e, const std::vector<size_t>& indices) {
             for (auto& [p, local] : stage3_by_unit(e, indices))
               if (!local.empty()) p->fetch_checked(local);
           },
           py::call_guard<py::gil_scoped_release>())
      .def("prefetch_params",
           [](engine::Engine& e, const std::vector<size_t>& indices) {
             for (size_t i : indices) {
               auto [p, j] = stage3_param(e, i);
               p->fetch(j);
             }
           },
           py::call_guard<py::gil_scoped_release>())
      .def("release_params",
           [](engine::Engine& e, const std::vector<size_t>& indices) {
             for (size_t i : indices) {
               auto [p, j] = stage3_param(e, i);
               p->release(j);
             }
           },
           py::call_guard<py::gil_scoped_release>())
      .def("end_forward",
           [](engine::Engine& e) {
             need_stage3(e);
             for (const auto& u : e.units()) u->partition->end_forward();
           },
           py::call_guard<py::gil_scoped_release>())
      .def("take_fallback_flag",
           [](engine::Engine& e) {
             need_stage3(e);
             bool any = false;
             for (const auto& u : e.units()) any = u->partition->take_fallback_flag() || any;
             return any;
           })
      .def_property_readonly("in_fallback",
                             [](engine::Engine& e) {
                               need_stage3(e);
                               bool any = false;
                               for (const auto& u : e.units()) any = any || u->partition->in_fallback();
                               return any;
                             })
      .def("is_live", [](engine::Engine& e, size_t i) { auto [p, j] = stage3_param(e, i); return p->live(j); })
      .def("is_persistent", [](engine::Engine& e, size_t i) { auto [p, j] = stage3_param(e, i); return p->persistent(j); })
      .def("param_numel", [](engine::Engine& e, size_t i) { auto [p, j] = stage3_param(e, i); return p->numel(j); })
      .def_property_readonly("live_elements",
                             [](engine::Engine& e) {
                               need_stage3(e);
                               int64_t n = 0;
                               for (const auto& u : e.units()) n += u->partition->live_elements();
                               return n;
                             })
      // With several units, the sum of each unit's peak (an upper bound on the peak of the sum).
      .def_property_readonly("peak_live_elements",
                             [](engine::Engine& e) {
                               need_stage3(e);
                               int64_t n = 0;
                               for (const auto& u : e.units()) n += u->partition->peak_live_elements();
                               return n;
                             })
      .def("saved_param_index",
           [](engine::Engine& e, const at::Tensor& t) -> int64_t {
             if (e.stage() != 3 || !t.has_storage()) return -1;
             for (const auto& u : e.units()) {
               int64_t j = u->partition->index_of_storage(t.storage().data());
               if (j < 0) continue;
               if (u->partition->full(j).scalar_type() != t.scalar_type()) return -1;
               return static_cast<int64_t>(e.engine_index(*u, j));
             }
             return -1;
           })
      .def("full_param",
           [](engine::Engine& e, size_t i) {
             auto [p, j] = stage3_param(e, i);
             {
               py::gil_scoped_release nogil;
               p->fetch_checked({j});
             }
             return p->full(j);
           })
      .def("absorb_parameter", &engine::Engine::absorb_parameter)
      // The (host) group parameter i is reduced and partitioned over: its unit's.
      .def("param_group",
           [](engine::Engine& e, size_t i) {
             if (i >= e.parameters().size() + e.frozen_parameters().size())
               throw Error("parameter index " + std::to_string(i) + " out of range");
             // a frozen parameter is partitioned with the one unit's (Note [Frozen parameters])
             return e.mesh()->group(i < e.parameters().size() ? e.unit_of(i).axes : e.units().front()->axes);
           })
      .def("save_checkpoint",
           [](engine::Engine& e, const std::string& dir, const std::string& tag, const std::string& client_json,
              const std::vector<std::pair<std::string, at::Tensor>>& extra, bool save_latest) {
             py::gil_scoped_release nogil;
             return e.save_checkpoint(dir, tag, client_json, extra, save_latest);
           },
           py::arg("save_dir"), py::arg("tag"), py::arg("client_state_json"), py::arg("extra"),
           py::arg("save_latest") = true)
      .def("save_checkpoint_part", &engine::Engine::save_checkpoint_part, py::arg("everyone"), py::arg("save_dir"),
           py::arg("tag"), py::arg("part"), py::arg("parts"), py::arg("layout_json"), py::arg("client_state_json"),
           py::arg("extra"), py::arg("save_latest") = true, py::call_guard<py::gil_scoped_release>())
      .def("load_checkpoint", &engine::Engine::load_checkpoint, py::arg("load_dir"), py::arg("tag"),
           py::arg("load_optimizer_states"), py::arg("load_lr_scheduler_states"), py::arg("load_module_only"),
           py::call_guard<py::gil_scoped_release>())
      .def("load_checkpoint_parts", &engine::Engine::load_checkpoint_parts, py::arg("dirs"),
           py::arg("load_optimizer_states"), py::arg("load_lr_scheduler_states"), py::arg("load_module_only"),
           py::call_guard<py::gil_scoped_release>())
      .def("set_checkpoint_fault_hook", &engine::Engine::set_checkpoint_fault_hook)
      .def_property_readonly("fragments", [](const engine::Engine& e) {
        py::list out;
        for (const auto& f : e.fragments()) out.append(py::make_tuple(f.param, f.begin, f.end, f.local));
        return out;
      })
      .def_property_readonly("grad_shard", &engine::Engine::grad_shard)
      .def_property_readonly("master", &engine::Engine::master)
      .def_property_readonly("param_shard", [](engine::Engine& e) { return stage3(e)->shard(); })
      .def_property_readonly("rank", [](const engine::Engine& e) { return e.world()->rank(); })
      .def_property_readonly("backend", [](const engine::Engine& e) { return e.world()->backend_name(); })
      .def_property_readonly("world_size", [](const engine::Engine& e) { return e.world()->size(); });
}

}  // namespace zeal::bindings
