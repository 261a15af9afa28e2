// Layer core: errors (Python exceptions of matching kinds), the parsed config, build info.
#include "bindings.h"

#include "zeal/comm/world.h"
#include "zeal/core/config.h"
#include "zeal/core/error.h"
#include "zeal/core/json.h"
#include "zeal/features.h"
#include "zeal/optim/cpu_optim.h"

namespace zeal::bindings {
void bind_core(py::module_& m) {
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
      .def_readonly("quantized_weights", &ZeroConfig::quantized_weights)
      .def_readonly("quantized_nontrainable_weights", &ZeroConfig::quantized_nontrainable_weights)
      .def_readonly("hpz_partition_size", &ZeroConfig::hpz_partition_size)
      .def_readonly("quantized_gradients", &ZeroConfig::quantized_gradients)
      .def_readonly("mics_shard_size", &ZeroConfig::mics_shard_size)
      .def_property_readonly("loco", [](const ZeroConfig& z) -> py::object {  // None when LoCo is off
        if (!z.loco.enabled) return py::none();
        py::dict d;
        d["err_beta"] = z.loco.err_beta;
        d["reset_T"] = z.loco.reset_T;
        return d;
      })
      .def_property_readonly("offload_optimizer_device", [](const ZeroConfig& z) {
        return z.offload_optimizer.device == OffloadDevice::kCpu ? "cpu" : z.offload_optimizer.device == OffloadDevice::kNvme ? "nvme" : "none";
      });
  py::class_<Config>(m, "Config", "A parsed, validated config (zeal/core/config.h).")
      .def_readonly("comms_timeout_s", &Config::comms_timeout_s)
      .def_readonly("sequence_parallel_size", &Config::sequence_parallel_size)
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

  m.attr("DEFAULT_COMMS_TIMEOUT_S") = kDefaultCommsTimeoutS;
  m.attr("MAX_JSON_DEPTH") = kMaxJsonDepth;
  m.attr("LR_SCHEDULES") = py::cast(scheduler_names());
}

}  // namespace zeal::bindings
