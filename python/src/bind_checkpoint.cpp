// Layer checkpoint: reading, sealing and converting checkpoints outside the engine.
#include "bindings.h"

#include <ATen/ops/empty.h>

#include "zeal/checkpoint/checkpoint.h"
#include "zeal/checkpoint/integrity.h"
#include "zeal/core/error.h"
#include "zeal/core/json.h"

namespace zeal::bindings {
namespace {

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


}  // namespace

void bind_checkpoint(py::module_& m) {
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

}

}  // namespace zeal::bindings
