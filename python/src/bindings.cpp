// The _zeal extension: bindings only, no logic of its own. C++ errors become Python exceptions
// of matching kinds (docs/errors.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <pybind11/functional.h>
#include <ATen/ops/empty.h>

#include "zeal/checkpoint/checkpoint.h"
#include "zeal/checkpoint/integrity.h"
#include "zeal/core/json.h"
#include "zeal/comm/compressed.h"
#include "zeal/comm/world.h"
#include "zeal/features.h"
#if ZEAL_WITH_MPI
#include "zeal/comm/mpi_backend.h"
#endif
#include "zeal/core/config.h"
#include "zeal/core/error.h"
#include "zeal/engine/engine.h"
#include "zeal/optim/cpu_optim.h"
#include "zeal/optim/client_optimizer.h"
#include "zeal/parallel/mesh.h"
#include "zeal/parallel/placement.h"
#include "zeal/parallel/process_groups.h"
#include "zeal/parallel/schedule.h"
#include "zeal/features.h"
#if ZEAL_WITH_CUDA
#include "zeal/comm/nccl_backend.h"
#include "zeal/optim/fused_adam.h"
#include "zeal/optim/fused_lamb.h"
#endif

namespace py = pybind11;
using namespace zeal;

namespace {

comm::Timeout to_timeout(double seconds) {
  return comm::Timeout(static_cast<int64_t>(seconds * 1000.0));
}

comm::ReduceOp to_reduce_op(const std::string& name) {
  if (name == "sum") return comm::ReduceOp::kSum;
  if (name == "avg") return comm::ReduceOp::kAvg;
  if (name == "max") return comm::ReduceOp::kMax;
  if (name == "min") return comm::ReduceOp::kMin;
  throw CommError("unknown reduce op '" + name + "': expected sum, avg, max or min");
}

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

zero::ParamPartition* stage3(engine::Engine& e) {
  zero::ParamPartition* p = e.partition();
  if (!p) throw Error("this operation needs ZeRO stage 3; the engine runs stage " + std::to_string(e.stage()));
  return p;
}


// Every tensor of a safetensors file by name, each checked against its CRC32 (when it has one,
// unless require_checksums).
py::dict tensors_of(const checkpoint::SafetensorsReader& reader, bool require_checksums) {
  py::dict out;
  for (const auto& [name, entry] : reader.entries()) {
    if (require_checksums || reader.metadata().count("crc32:" + name)) reader.verify(name);
    out[py::str(name)] = reader.read_all(name);
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

PYBIND11_MODULE(_zeal, m) {
  m.doc() = "Zeal's C++ core";
  m.attr("__version__") = ZEAL_VERSION;
  m.attr("__git_hash__") = ZEAL_GIT_HASH;
  m.attr("__git_branch__") = ZEAL_GIT_BRANCH;
  m.attr("with_cuda") = static_cast<bool>(ZEAL_WITH_CUDA);
  m.def("build_info", [] {
    py::dict d;
    d["version"] = ZEAL_VERSION;
    d["compiler"] = ZEAL_CXX_COMPILER;
    d["with_mpi"] = static_cast<bool>(ZEAL_WITH_MPI);
    d["with_cuda"] = static_cast<bool>(ZEAL_WITH_CUDA);
    d["cuda_version"] = ZEAL_CUDA_VERSION;
    d["cuda_architectures"] = ZEAL_CUDA_ARCHITECTURES;
    d["mpi_library"] = comm::mpi_library_version();
    d["nccl_version"] = comm::nccl_version();
    d["cpu_isa"] = optim::cpu_adam_isa();
    return d;
  }, "What this build of Zeal was compiled with and loaded (zeal-report).");

  // Base classes first: pybind11 tries the most recently registered translator first.
  auto& error = py::register_exception<Error>(m, "Error", PyExc_RuntimeError);
  py::register_exception<InternalError>(m, "InternalError", error.ptr());
  py::register_exception<ConfigError>(m, "ConfigError", py::make_tuple(error, py::handle(PyExc_ValueError)));
  auto& comm_error = py::register_exception<CommError>(m, "CommError", error.ptr());
  py::register_exception<TimeoutError>(m, "TimeoutError",
                                       py::make_tuple(comm_error, py::handle(PyExc_TimeoutError)));
  py::register_exception<IoError>(m, "IoError", py::make_tuple(error, py::handle(PyExc_OSError)));
  py::register_exception<CheckpointError>(m, "CheckpointError", error.ptr());

  // The parsed config travels to the Engine as an object: a config is parsed once (Config::parse_text).
  // What the engine's DeepSpeed-style queries read (python/zeal/engine.py EngineAPI): the parsed
  // values with their defaults, so the defaults are written once, in config.h.
  py::class_<ZeroConfig>(m, "ZeroConfig", "zero_optimization, parsed (zeal/core/config.h).")
      .def_readonly("stage", &ZeroConfig::stage)
      .def_readonly("reduce_bucket_size", &ZeroConfig::reduce_bucket_size)
      .def_readonly("reduce_scatter", &ZeroConfig::reduce_scatter)
      .def_readonly("overlap_comm", &ZeroConfig::overlap_comm)
      .def_readonly("contiguous_gradients", &ZeroConfig::contiguous_gradients)
      .def_readonly("allgather_partitions", &ZeroConfig::allgather_partitions)
      .def_readonly("allgather_bucket_size", &ZeroConfig::allgather_bucket_size)
      .def_readonly("prefetch_bucket_size", &ZeroConfig::prefetch_bucket_size)
      .def_readonly("param_persistence_threshold", &ZeroConfig::param_persistence_threshold)
      .def_readonly("max_live_parameters", &ZeroConfig::max_live_parameters)
      .def_readonly("max_reuse_distance", &ZeroConfig::max_reuse_distance)
      .def_readonly("model_persistence_threshold", &ZeroConfig::model_persistence_threshold)
      .def_readonly("gather_16bit_weights_on_model_save", &ZeroConfig::gather_16bit_weights_on_model_save)
      .def_readonly("ignore_unused_parameters", &ZeroConfig::ignore_unused_parameters)
      .def_readonly("sub_group_size", &ZeroConfig::sub_group_size)
      .def_readonly("round_robin_gradients", &ZeroConfig::round_robin_gradients)
      .def_readonly("elastic_checkpoint", &ZeroConfig::elastic_checkpoint)
      .def_readonly("load_from_fp32_weights", &ZeroConfig::load_from_fp32_weights)
      .def_property_readonly("offload_optimizer_device", [](const ZeroConfig& z) {
        return z.offload_optimizer.device == OffloadDevice::kCpu ? "cpu" : z.offload_optimizer.device == OffloadDevice::kNvme ? "nvme" : "none";
      });
  py::class_<Config>(m, "Config", "A parsed, validated config (zeal/core/config.h).")
      .def_readonly("comms_timeout_s", &Config::comms_timeout_s)
      .def_readonly("steps_per_print", &Config::steps_per_print)
      .def_readonly("gradient_clipping", &Config::gradient_clipping)
      .def_readonly("gradient_predivide_factor", &Config::gradient_predivide_factor)
      .def_readonly("prescale_gradients", &Config::prescale_gradients)
      .def_readonly("wall_clock_breakdown", &Config::wall_clock_breakdown)
      .def_readonly("zero_optimization", &Config::zero_optimization)
      .def_property_readonly("flops_profiler", [](const Config& c) {
        // The section's values (python/zeal/profiling/flops_profiler.py and the engine's queries).
        const auto& f = c.flops_profiler;
        return py::dict(py::arg("enabled") = f.enabled, py::arg("recompute_fwd_factor") = f.recompute_fwd_factor,
                        py::arg("profile_step") = f.profile_step, py::arg("module_depth") = f.module_depth,
                        py::arg("top_modules") = f.top_modules, py::arg("detailed") = f.detailed,
                        py::arg("output_file") = f.output_file);
      })
      .def_property_readonly("monitors", [](const Config& c) {
        // The enabled monitor sections, for python/zeal/monitor.py: {name: {key: value}}.
        py::dict out;
        for (auto [name, m] : {std::pair<const char*, const MonitorConfig*>{"tensorboard", &c.tensorboard},
                               {"csv_monitor", &c.csv_monitor}})
          if (m->enabled) out[name] = py::dict(py::arg("output_path") = m->output_path, py::arg("job_name") = m->job_name);
        if (c.wandb.enabled)
          out["wandb"] = py::dict(py::arg("team") = c.wandb.team, py::arg("group") = c.wandb.group,
                                  py::arg("project") = c.wandb.project);
        return out;
      })
      .def_property_readonly("fp16_enabled", [](const Config& c) { return c.precision() == Precision::kFp16; })
      .def_property_readonly("bf16_enabled", [](const Config& c) { return c.precision() == Precision::kBf16; });
  m.def("validate_config", [](const std::string& text) { return Config::from_string(text); },
        "Parse and validate a JSON config; returns it for the Engine, or raises ConfigError naming the bad key.");
  m.def("check_config_text", [](const py::bytes& data) { Config::parse_text(std::string(data)); }, py::arg("data"),
        "Raises ConfigError if the config's bytes are not a config's JSON (Config::parse_text).");
  m.def("normalize_config_text", [](const py::bytes& data) {
          std::string text(data);
          Config::parse_text(text);  // refuses with the byte offset and key path
          return py::str(relax_config_json(text, /*mark_infinity=*/false));  // Python's json reads Infinity
        }, py::arg("data"),
        "The config's bytes checked (Config::parse_text) and returned as JSON Python's json module reads: comments "
        "and trailing commas blanked.");
  m.def("resolve_batch", [](const std::string& text, int64_t dp) {
    BatchSizes b = Config::from_string(text).resolve_batch(dp);
    return py::make_tuple(b.train_batch_size, b.micro_batch_size, b.gradient_accumulation_steps);
  });

  py::class_<comm::RankInfo>(m, "RankInfo")
      .def_readonly("rank", &comm::RankInfo::rank)
      .def_readonly("world_size", &comm::RankInfo::world_size)
      .def_readonly("local_rank", &comm::RankInfo::local_rank)
      .def_readonly("local_size", &comm::RankInfo::local_size)
      .def_readonly("under_mpi", &comm::RankInfo::under_mpi);
  m.def("detect_rank_info", &comm::detect_rank_info);

  py::class_<comm::Work, comm::WorkPtr>(m, "Work")
      .def("is_completed", &comm::Work::is_completed)
      .def("wait", [](comm::Work& w) { w.wait(); }, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("description", &comm::Work::description);

  py::class_<comm::Communicator, comm::CommunicatorPtr>(m, "Communicator")
      .def_property_readonly("rank", &comm::Communicator::rank)
      .def_property_readonly("size", &comm::Communicator::size)
      .def_property_readonly("name", &comm::Communicator::name)
      .def_property_readonly("backend", &comm::Communicator::backend_name)
      .def_property_readonly(
          "timeout_s", [](const comm::Communicator& c) { return c.default_timeout().count() / 1000.0; },
          "The deadline of an op that names none (Note [One comms timeout]).")
      .def("all_reduce",
           [](comm::Communicator& c, at::Tensor t, const std::string& op, double timeout_s) {
             return c.all_reduce(t, {to_reduce_op(op), to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("op") = "sum", py::arg("timeout_s") = 0.0)
      .def("reduce_scatter",
           [](comm::Communicator& c, at::Tensor out, const at::Tensor& in, const std::string& op, double timeout_s) {
             return c.reduce_scatter(out, in, {to_reduce_op(op), to_timeout(timeout_s)});
           },
           py::arg("output"), py::arg("input"), py::arg("op") = "sum", py::arg("timeout_s") = 0.0)
      .def("all_gather",
           [](comm::Communicator& c, at::Tensor out, const at::Tensor& in, double timeout_s) {
             return c.all_gather(out, in, {to_timeout(timeout_s)});
           },
           py::arg("output"), py::arg("input"), py::arg("timeout_s") = 0.0)
      .def("broadcast",
           [](comm::Communicator& c, at::Tensor t, int root, double timeout_s) {
             return c.broadcast(t, {root, to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("root") = 0, py::arg("timeout_s") = 0.0)
      .def("barrier", [](comm::Communicator& c, double timeout_s) { return c.barrier({to_timeout(timeout_s)}); },
           py::arg("timeout_s") = 0.0)
      .def("send",
           [](comm::Communicator& c, const at::Tensor& t, int dst, int tag, double timeout_s) {
             return c.send(t, dst, {tag, to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("dst"), py::arg("tag") = 0, py::arg("timeout_s") = 0.0)
      .def("recv",
           [](comm::Communicator& c, at::Tensor t, int src, int tag, double timeout_s) {
             return c.recv(t, src, {tag, to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("src"), py::arg("tag") = 0, py::arg("timeout_s") = 0.0)
      .def("__eq__", [](const comm::CommunicatorPtr& a, const py::object& b) {
        return py::isinstance<comm::Communicator>(b) && a.get() == b.cast<comm::CommunicatorPtr>().get();
      })
      .def("__hash__", [](const comm::CommunicatorPtr& a) { return std::hash<const void*>{}(a.get()); })
      .def("split", &comm::Communicator::split, py::arg("ranks"), py::arg("name"),
           py::call_guard<py::gil_scoped_release>(),
           "A communicator over `ranks` (global ranks, in that order); every rank of this one calls it.");

  using Axes = std::vector<std::string>;
  // An axis argument is a name or a list of names (a product of axes).
  auto axes_arg = [](const py::object& axes) {
    return py::isinstance<py::str>(axes) ? Axes{axes.cast<std::string>()} : axes.cast<Axes>();
  };
  py::class_<parallel::Mesh>(m, "Mesh",
                             "Ranks on named axes, outermost first, the last fastest (zeal/parallel/mesh.h). Axis "
                             "arguments take a name or a list of names (their product).")
      .def(py::init([](const std::vector<std::pair<std::string, int>>& axes) {
             std::vector<parallel::Mesh::Axis> out;
             for (const auto& [name, size] : axes) out.push_back({name, size});
             return parallel::Mesh(std::move(out));
           }),
           py::arg("axes"))
      .def_static("with_sizes", &parallel::Mesh::with_sizes, py::arg("pipe") = 1, py::arg("data") = 1,
                  py::arg("expert") = 1, py::arg("sequence") = 1, py::arg("tensor") = 1, py::arg("data_inner") = 1)
      .def_property_readonly("world_size", &parallel::Mesh::world_size)
      .def_property_readonly("axes",
                             [](const parallel::Mesh& m) {
                               std::vector<std::pair<std::string, int>> out;
                               for (const auto& a : m.axes()) out.emplace_back(a.name, a.size);
                               return out;
                             })
      .def("has_axis", &parallel::Mesh::has_axis)
      .def("axis_size", &parallel::Mesh::axis_size)
      .def("size_of", [=](const parallel::Mesh& m, const py::object& axes) { return m.size_of(axes_arg(axes)); })
      .def("coords", &parallel::Mesh::coords)
      .def("coord", &parallel::Mesh::coord, py::arg("rank"), py::arg("axis"))
      .def("rank_of", &parallel::Mesh::rank_of)
      .def("groups", [=](const parallel::Mesh& m, const py::object& axes) { return m.groups(axes_arg(axes)); })
      .def("group_of", [=](const parallel::Mesh& m, const py::object& axes, int rank) {
        return m.group_of(axes_arg(axes), rank);
      })
      .def("group_index", [=](const parallel::Mesh& m, const py::object& axes, int rank) {
        return m.group_index(axes_arg(axes), rank);
      })
      .def("other_axes", [=](const parallel::Mesh& m, const py::object& axes) { return m.other_axes(axes_arg(axes)); })
      .def("key", [=](const parallel::Mesh& m, const py::object& axes) { return m.key(axes_arg(axes)); })
      .def("__eq__", &parallel::Mesh::operator==)
      .def("__repr__", [](const parallel::Mesh& m) { return "Mesh(" + m.describe() + ")"; });

  py::class_<parallel::ProcessGroups, std::shared_ptr<parallel::ProcessGroups>>(
      m, "ProcessGroups", "The communicators of a mesh, each cut once (zeal/parallel/process_groups.h).")
      .def(py::init<parallel::Mesh, comm::CommunicatorPtr>(), py::arg("mesh"), py::arg("world"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("mesh", &parallel::ProcessGroups::mesh)
      .def_property_readonly("rank", &parallel::ProcessGroups::rank)
      .def_property_readonly("world", &parallel::ProcessGroups::world)
      .def("coord", &parallel::ProcessGroups::coord, py::arg("axis"))
      .def("group", [=](const parallel::ProcessGroups& g, const py::object& axes) { return g.group(axes_arg(axes)); },
           py::arg("axes"))
      .def("axes_of",
           [](const parallel::ProcessGroups& g, const comm::CommunicatorPtr& c) -> py::object {
             const Axes* axes = g.axes_of(c.get());
             return axes ? py::cast(*axes) : py::object(py::none());
           })
      .def("custom", &parallel::ProcessGroups::custom, py::arg("key"), py::arg("ranks"),
           py::call_guard<py::gil_scoped_release>());
  m.def("reduction_axes", [](const parallel::Mesh& mesh, const Axes& split) {
    return parallel::reduction_axes(mesh, parallel::Placement{split, {}});
  }, py::arg("mesh"), py::arg("split") = Axes{}, "The axes a parameter split over `split` reduces its gradient over.");

  py::enum_<parallel::Op>(m, "PipeOp", "A pipeline instruction (zeal/parallel/schedule.h).")
      .value("LoadMicroBatch", parallel::Op::kLoadMicroBatch)
      .value("RecvActivation", parallel::Op::kRecvActivation)
      .value("Forward", parallel::Op::kForward)
      .value("SendActivation", parallel::Op::kSendActivation)
      .value("RecvGrad", parallel::Op::kRecvGrad)
      .value("Backward", parallel::Op::kBackward)
      .value("SendGrad", parallel::Op::kSendGrad)
      .value("ReduceGrads", parallel::Op::kReduceGrads)
      .value("OptimizerStep", parallel::Op::kOptimizerStep);
  m.def("pipeline_schedule",
        [](const std::string& kind, int stages, int stage, int micro_batches, int chunks) {
          py::list out;
          for (const parallel::Instruction& in : parallel::make_schedule(
                   parallel::schedule_kind_from_string(kind), {stages, stage, micro_batches, chunks}))
            out.append(py::make_tuple(in.op, in.micro_batch, in.chunk));
          return out;
        },
        py::arg("kind"), py::arg("stages"), py::arg("stage"), py::arg("micro_batches"), py::arg("chunks") = 1,
        "One stage's instructions for one batch, as (op, micro_batch, chunk) tuples (zeal/parallel/schedule.h).");
  m.def("pipeline_simulated_bubble",
        [](const std::string& kind, int stages, int micro_batches, int chunks, double forward_time,
           double backward_time) {
          return parallel::simulated_bubble(parallel::schedule_kind_from_string(kind), stages, micro_batches, chunks,
                                            forward_time, backward_time);
        },
        py::arg("kind"), py::arg("stages"), py::arg("micro_batches"), py::arg("chunks") = 1,
        py::arg("forward_time") = 1.0, py::arg("backward_time") = 2.0);

  py::class_<comm::OneBitState>(m, "OneBitState", "The error buffers of one tensor's compressed all-reduce.")
      .def(py::init<>())
      .def_readonly("worker_error", &comm::OneBitState::worker_error)
      .def_readonly("server_error", &comm::OneBitState::server_error)
      .def("reset", &comm::OneBitState::reset);
  m.def("compressed_all_reduce",
        [](comm::Communicator& c, at::Tensor t, comm::OneBitState& state, double timeout_s) {
          comm::compressed_all_reduce(c, t, state, to_timeout(timeout_s));
        },
        py::arg("comm"), py::arg("tensor"), py::arg("state"), py::arg("timeout_s") = 0.0,
        py::call_guard<py::gil_scoped_release>(),
        "In place: the error-compensated 1-bit average of `tensor` over the ranks (zeal/comm/compressed.h).");
  m.def("compressed_all_reduce_bytes", &comm::compressed_all_reduce_bytes, py::arg("numel"), py::arg("world"));

  m.def("world", [](double timeout_s) { return comm::world(to_timeout(timeout_s)); }, py::arg("timeout_s") = 0.0,
        "The process's world communicator (created on first call); a timeout_s > 0 sets the process's "
        "default collective timeout (Note [One comms timeout]).");
  m.def("set_default_timeout", [](double timeout_s) { comm::set_default_timeout(to_timeout(timeout_s)); },
        py::arg("timeout_s"), "The deadline of every collective that names none (comms_timeout_s).");
  m.def("default_timeout_s", [] { return comm::default_timeout().count() / 1000.0; });
  m.attr("DEFAULT_COMMS_TIMEOUT_S") = kDefaultCommsTimeoutS;
  m.attr("MAX_JSON_DEPTH") = kMaxJsonDepth;
  m.attr("LR_SCHEDULES") = py::cast(scheduler_names());
#if ZEAL_WITH_MPI
  m.def("inject_dropped_collective", &comm::inject_dropped_collective, py::arg("group_prefix"), py::arg("after"),
        "Test hook: this process silently drops one collective (Note [Injected collective faults]).");
  m.def("set_signature_checks", &comm::set_signature_checks, py::arg("on"),
        "Benchmarks only: compare collective signatures across ranks (on by default).");
#endif
  m.def("shutdown", &comm::shutdown, py::call_guard<py::gil_scoped_release>());
#if ZEAL_WITH_CUDA
  m.def("fused_adam_step",
        [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq, double lr, double beta1,
           double beta2, double eps, double weight_decay, bool adamw, bool bias_correction, int64_t step) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, step};
          py::gil_scoped_release nogil;
          optim::fused_adam_step(params, grads, exp_avg, exp_avg_sq, h);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("adamw"),
        py::arg("bias_correction"), py::arg("step"), "Multi-tensor fused Adam/AdamW on CUDA tensors.");
  m.def("fused_lamb_step",
        [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq, double lr, double beta1,
           double beta2, double eps, double weight_decay, bool bias_correction, int64_t step, double min_coeff,
           double max_coeff) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, true, bias_correction, step};
          py::gil_scoped_release nogil;
          optim::fused_lamb_step(params, grads, exp_avg, exp_avg_sq, h, min_coeff, max_coeff);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("bias_correction"),
        py::arg("step"), py::arg("min_coeff"), py::arg("max_coeff"),
        "Multi-tensor fused LAMB on CUDA tensors (a trust ratio per tensor).");
  m.def("nccl_world",
        [](int device, double timeout_s) {
          auto host = comm::world(to_timeout(timeout_s));
          return comm::nccl_world(host, device, comm::default_timeout());
        },
        py::arg("device"), py::arg("timeout_s") = 0.0,
        "A communicator over the world's ranks for tensors on CUDA device `device` (NCCL).");
#endif

  m.def("cpu_adam_step",
        [](const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
           double lr, double beta1, double beta2, double eps, double weight_decay, bool adamw, bool bias_correction,
           int64_t step, std::optional<at::Tensor> half_copy, const std::string& isa) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, step,
                             isa.empty() ? nullptr : isa.c_str()};
          py::gil_scoped_release nogil;
          optim::cpu_adam_step(params, grads, exp_avg, exp_avg_sq, h, half_copy ? &*half_copy : nullptr);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("adamw"),
        py::arg("bias_correction"), py::arg("step"), py::arg("half_copy") = py::none(), py::arg("isa") = "",
        "One Adam/AdamW step on contiguous fp32 CPU tensors (vectorised, multithreaded).");
  m.def("unscale_and_sum_squares", &optim::unscale_and_sum_squares, py::arg("grads"), py::arg("inv_scale"),
        py::call_guard<py::gil_scoped_release>(),
        "grads *= inv_scale in place; returns the sum of squares of the result (one pass; CPU or CUDA).");
  m.def("cpu_triad",
        [](const at::Tensor& a, const at::Tensor& b, std::optional<at::Tensor> c, double scalar) {
          py::gil_scoped_release nogil;
          optim::cpu_triad(a, b, c ? *c : at::Tensor(), scalar);
        },
        py::arg("a"), py::arg("b"), py::arg("c") = py::none(), py::arg("scalar") = 3.0,
        "The bandwidth roofline: a = b + scalar * c (STREAM triad), or a += scalar * b without c.");
  m.def("cpu_adam_isa", &optim::cpu_adam_isa, "The instruction set the CPU optimizer kernels use on this CPU.");
  m.def("cpu_adagrad_step", &optim::cpu_adagrad_step, py::arg("params"), py::arg("grads"), py::arg("state_sum"),
        py::arg("lr"), py::arg("lr_decay"), py::arg("weight_decay"), py::arg("eps"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_sgd_step", &optim::cpu_sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffer"),
        py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        py::arg("first_step"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_lamb_step",
        [](const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
           double lr, double beta1, double beta2, double eps, double weight_decay, bool bias_correction, int64_t step,
           double min_coeff, double max_coeff) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, true, bias_correction, step};
          py::gil_scoped_release nogil;
          return optim::cpu_lamb_step(params, grads, exp_avg, exp_avg_sq, h, min_coeff, max_coeff);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("bias_correction"),
        py::arg("step"), py::arg("min_coeff"), py::arg("max_coeff"), "One LAMB step on one tensor; returns its trust ratio.");
  m.def("checkpoint_parts_to_fp32", &checkpoint::to_fp32_parts, py::arg("dirs"), py::arg("out_path"),
        py::call_guard<py::gil_scoped_release>());
  m.def("checkpoint_to_fp32", &checkpoint::to_fp32, py::arg("checkpoint_dir"), py::arg("out_path"),
        py::call_guard<py::gil_scoped_release>(),
        "Consolidate a checkpoint into one fp32 safetensors file, one parameter in memory at a time.");
  m.def("resolve_checkpoint", &checkpoint::resolve_tag, py::arg("save_dir"), py::arg("tag") = "");
  m.def("write_text_atomically", &checkpoint::write_text_atomically, py::arg("path"), py::arg("text"),
        "Write a small file through a temporary name, fsynced, then renamed over `path`.");
  m.def("read_latest", &checkpoint::read_latest, py::arg("save_dir"),
        "The tag that <save_dir>/latest names (CheckpointError if it is missing, not a regular file or not a tag).");
  m.attr("CHECKPOINT_PARTS_FILE") = checkpoint::kPartsName;
  m.def("write_sealed_json",
        [](const std::string& path, const std::string& text) {
          nlohmann::json doc;
          JsonProblem problem;
          ZEAL_CHECK_AS(CheckpointError, parse_json(text, doc, problem), "write_sealed_json: ", problem.describe());
          checkpoint::write_text_atomically(path, checkpoint::seal_json(std::move(doc)));
        },
        py::arg("path"), py::arg("text"), "Write a JSON manifest with its checksum, atomically.");
  m.def("read_sealed_json",
        [](const std::string& path) { return checkpoint::read_sealed_json(path).dump(); }, py::arg("path"),
        "A checkpoint manifest's JSON text, its checksum verified (and removed) when it has one.");
  m.def("read_checkpoint_extra",
        [](const std::string& dir) {
          return tensors_of(*checkpoint::open_extra(dir), /*require_checksums=*/true);
        },
        py::arg("dir"), "The module state (buffers, frozen parameters) of checkpoint directory dir, checked.");
  m.def("read_safetensors",
        [](const std::string& path) {
          return tensors_of(checkpoint::SafetensorsReader(path), /*require_checksums=*/false);
        },
        py::arg("path"), "Read every tensor of a safetensors file (checksums verified when present).");
  m.def("checkpoint_read_parameters",
        [](const std::vector<std::string>& dirs) {
          checkpoint::WholeParameters params(dirs);
          py::dict out;
          for (size_t i = 0; i < params.size(); ++i) out[py::str(params.name(i))] = params.read(i);
          return out;
        },
        py::arg("dirs"), "Every parameter of a checkpoint's parts as a whole fp32 tensor (slices joined).");

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
        ZEAL_CHECK(!e.swapper(), "the optimizer state of this engine lives in NVMe swap files");
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
      // Stage 3: gather / release parameters by engine index (python/zeal/zero.py drives these).
      .def("fetch_params",
           [](engine::Engine& e, const std::vector<size_t>& indices) {
             stage3(e)->fetch_checked(indices);
           },
           py::call_guard<py::gil_scoped_release>())
      .def("prefetch_params",
           [](engine::Engine& e, const std::vector<size_t>& indices) {
             auto* p = stage3(e);
             for (size_t i : indices) p->fetch(i);
           },
           py::call_guard<py::gil_scoped_release>())
      .def("release_params",
           [](engine::Engine& e, const std::vector<size_t>& indices) {
             auto* p = stage3(e);
             for (size_t i : indices) p->release(i);
           },
           py::call_guard<py::gil_scoped_release>())
      .def("end_forward", [](engine::Engine& e) { stage3(e)->end_forward(); },
           py::call_guard<py::gil_scoped_release>())
      .def("take_fallback_flag", [](engine::Engine& e) { return stage3(e)->take_fallback_flag(); })
      .def_property_readonly("in_fallback", [](engine::Engine& e) { return stage3(e)->in_fallback(); })
      .def("is_live", [](engine::Engine& e, size_t i) { return stage3(e)->live(i); })
      .def("is_persistent", [](engine::Engine& e, size_t i) { return stage3(e)->persistent(i); })
      .def("param_numel", [](engine::Engine& e, size_t i) { return stage3(e)->numel(i); })
      .def_property_readonly("live_elements", [](engine::Engine& e) { return stage3(e)->live_elements(); })
      .def_property_readonly("peak_live_elements", [](engine::Engine& e) { return stage3(e)->peak_live_elements(); })
      .def("saved_param_index",
           [](engine::Engine& e, const at::Tensor& t) -> int64_t {
             auto* p = e.partition();
             if (!p || !t.has_storage()) return -1;
             int64_t i = p->index_of_storage(t.storage().data());
             if (i >= 0 && p->full(i).scalar_type() != t.scalar_type()) return -1;
             return i;
           })
      .def("full_param",
           [](engine::Engine& e, size_t i) {
             auto* p = stage3(e);
             {
               py::gil_scoped_release nogil;
               p->fetch_checked({i});
             }
             return p->full(i);
           })
      .def("absorb_parameter", &engine::Engine::absorb_parameter)
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
