// Layer parallel: the mesh, its process groups, parameter placement, pipeline schedules.
#include "bindings.h"

#include "zeal/parallel/mesh.h"
#include "zeal/parallel/placement.h"
#include "zeal/parallel/process_groups.h"
#include "zeal/parallel/schedule.h"

namespace zeal::bindings {
void bind_parallel(py::module_& m) {
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
                  py::arg("expert") = 1, py::arg("sequence") = 1, py::arg("tensor") = 1, py::arg("data_inner") = 1,
                  py::arg("ring") = 1)
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
  m.def("sample_axes", &parallel::sample_axes,
        "The axes whose ranks see different samples (Note [Samples per step]): a loader shards over these.");
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

}

}  // namespace zeal::bindings
