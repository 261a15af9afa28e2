// The _zeal extension: bindings only, no logic of its own, one file per layer (bind_<layer>.cpp),
// registered in dependency order by module.cpp. C++ errors become Python exceptions of matching
// kinds (docs/errors.md).
#pragma once

#include <string>

#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "zeal/comm/communicator.h"

namespace zeal::bindings {
namespace py = pybind11;

comm::Timeout to_timeout(double seconds);
comm::ReduceOp to_reduce_op(const std::string& name);

void bind_core(py::module_& m);        // errors, the parsed config, build info
void bind_comm(py::module_& m);        // communicators, the world, work handles
void bind_parallel(py::module_& m);    // the mesh, process groups, pipeline schedules
void bind_optim(py::module_& m);       // optimizer kernels
void bind_checkpoint(py::module_& m);  // reading and converting checkpoints
void bind_engine(py::module_& m);      // the engine

}  // namespace zeal::bindings
