// Layer comm: communicators, work handles, the world, timeouts, fault injection.
#include "bindings.h"

#include <ATen/ops/empty.h>

#include "zeal/comm/compressed.h"
#include "zeal/comm/quantized.h"
#include "zeal/comm/world.h"
#include "zeal/core/error.h"
#include "zeal/features.h"
#if ZEAL_WITH_MPI
#include "zeal/comm/mpi_backend.h"
#endif
#if ZEAL_WITH_CUDA
#include "zeal/comm/nccl_backend.h"
#endif

namespace zeal::bindings {
void bind_comm(py::module_& m) {
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

  // The ops release the GIL: a small collective runs on the calling thread and waits there for its
  // peers (Note [Caller-run collectives] in mpi_backend.cpp).
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
           py::arg("tensor"), py::arg("op") = "sum", py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("reduce_scatter",
           [](comm::Communicator& c, at::Tensor out, const at::Tensor& in, const std::string& op, double timeout_s) {
             return c.reduce_scatter(out, in, {to_reduce_op(op), to_timeout(timeout_s)});
           },
           py::arg("output"), py::arg("input"), py::arg("op") = "sum", py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("all_gather",
           [](comm::Communicator& c, at::Tensor out, const at::Tensor& in, double timeout_s) {
             return c.all_gather(out, in, {to_timeout(timeout_s)});
           },
           py::arg("output"), py::arg("input"), py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("broadcast",
           [](comm::Communicator& c, at::Tensor t, int root, double timeout_s) {
             return c.broadcast(t, {root, to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("root") = 0, py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("all_to_all",
           [](comm::Communicator& c, at::Tensor out, const at::Tensor& in, std::vector<int64_t> output_split_sizes,
              std::vector<int64_t> input_split_sizes, double timeout_s, std::string site) {
             comm::AllToAllOptions o;
             o.timeout = to_timeout(timeout_s);
             o.site = std::move(site);
             o.output_split_sizes = std::move(output_split_sizes);
             o.input_split_sizes = std::move(input_split_sizes);
             return c.all_to_all(out, in, o);
           },
           py::arg("output"), py::arg("input"), py::arg("output_split_sizes") = std::vector<int64_t>{},
           py::arg("input_split_sizes") = std::vector<int64_t>{}, py::arg("timeout_s") = 0.0, py::arg("site") = "",
           py::call_guard<py::gil_scoped_release>(),
           "Chunk j of input (input_split_sizes[j] dim-0 rows, or equal chunks) goes to rank j; chunk r of "
           "output comes from rank r.")
      .def("barrier", [](comm::Communicator& c, double timeout_s) { return c.barrier({to_timeout(timeout_s)}); },
           py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("send",
           [](comm::Communicator& c, const at::Tensor& t, int dst, int tag, double timeout_s) {
             return c.send(t, dst, {tag, to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("dst"), py::arg("tag") = 0, py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("recv",
           [](comm::Communicator& c, at::Tensor t, int src, int tag, double timeout_s) {
             return c.recv(t, src, {tag, to_timeout(timeout_s)});
           },
           py::arg("tensor"), py::arg("src"), py::arg("tag") = 0, py::arg("timeout_s") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("__eq__", [](const comm::CommunicatorPtr& a, const py::object& b) {
        return py::isinstance<comm::Communicator>(b) && a.get() == b.cast<comm::CommunicatorPtr>().get();
      })
      .def("__hash__", [](const comm::CommunicatorPtr& a) { return std::hash<const void*>{}(a.get()); })
      .def("split", &comm::Communicator::split, py::arg("ranks"), py::arg("name"),
           py::call_guard<py::gil_scoped_release>(),
           "A communicator over `ranks` (global ranks, in that order); every rank of this one calls it.");

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

  m.def("quantize_blocks",
        [](const at::Tensor& x, int bits, int64_t block, std::optional<at::Tensor> error, float error_beta) {
          comm::Quantized q = comm::quantize(x, bits, block, error ? &*error : nullptr, error_beta);
          return std::make_tuple(q.q, q.scales);  // converted after the GIL is back
        },
        py::arg("x"), py::arg("bits"), py::arg("block"), py::arg("error") = py::none(),
        py::arg("error_beta") = 0.0f, py::call_guard<py::gil_scoped_release>(),
        "(levels uint8, scales fp32): ZeRO++'s block-wise symmetric quantization of x (zeal/comm/quantized.h); "
        "with error, the blocks carry error feedback and error is updated in place (with error_beta > 0, as "
        "LoCo's moving average).");
  m.def("dequantize_blocks",
        [](const at::Tensor& q, const at::Tensor& scales, int64_t numel, int bits, int64_t block,
           std::optional<at::Tensor> out) {
          comm::Quantized in{q, scales, numel, block, bits};
          at::Tensor result = out ? *out : at::empty({numel}, scales.options().dtype(at::kFloat));
          comm::dequantize(in, result, out.has_value());
          return result;
        },
        py::arg("q"), py::arg("scales"), py::arg("numel"), py::arg("bits"), py::arg("block"),
        py::arg("accumulate_into") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "The fp32 values of quantize_blocks' output; with accumulate_into, added to that tensor (returned).");
  m.def("quantized_wire_bytes", &comm::quantized_wire_bytes, py::arg("numel"), py::arg("bits"), py::arg("block"));
  // qwZ's block (and that of frozen weights stored quantized), for what Python computes about it.
  m.attr("WEIGHT_BLOCK") = comm::kWeightBlock;

  m.def("world", [](double timeout_s) { return comm::world(to_timeout(timeout_s)); }, py::arg("timeout_s") = 0.0,
        "The process's world communicator (created on first call); a timeout_s > 0 sets the process's "
        "default collective timeout (Note [One comms timeout]).");
  m.def("set_default_timeout", [](double timeout_s) { comm::set_default_timeout(to_timeout(timeout_s)); },
        py::arg("timeout_s"), "The deadline of every collective that names none (comms_timeout_s).");
  m.def("default_timeout_s", [] { return comm::default_timeout().count() / 1000.0; });
#if ZEAL_WITH_MPI
  m.def("inject_dropped_collective", &comm::inject_dropped_collective, py::arg("group_prefix"), py::arg("after"),
        "Test hook: this process silently drops one collective (Note [Injected collective faults]).");
  m.def("set_signature_checks", &comm::set_signature_checks, py::arg("on"),
        "Benchmarks only: compare collective signatures across ranks (on by default).");
#endif
  m.def("shutdown", &comm::shutdown, py::call_guard<py::gil_scoped_release>());
#if ZEAL_WITH_CUDA
  m.def("nccl_world",
        [](int device, double timeout_s) {
          auto host = comm::world(to_timeout(timeout_s));
          return comm::nccl_world(host, device, comm::default_timeout());
        },
        py::arg("device"), py::arg("timeout_s") = 0.0,
        "A communicator over the world's ranks for tensors on CUDA device `device` (NCCL).");
#endif
}

}  // namespace zeal::bindings
