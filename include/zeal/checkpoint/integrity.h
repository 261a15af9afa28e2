// Reading checkpoint files that may be damaged, foreign or hostile, and sealing what Zeal writes.
//
// Note [Checkpoint integrity] (format version 2): nothing in a checkpoint is trusted until it is
// tied to the rest.
//  - A manifest (zeal_checkpoint.json, parts.json) carries "checksum": the xxh64 of its own
//    compact JSON without that key. An edited digit is refused, not loaded.
//  - Every save has a random save_id. Each shard's metadata carries it with the shard's place:
//    rank, world size, part and the byte length of its data section; the manifest records each
//    shard's file size and the xxh64 of its header bytes. A shard from another save, rank or part,
//    or one whose header was edited (offsets and CRCs swapped), is refused by name.
//  - The fragment table is checked whole before any value is copied: each parameter's fragments
//    cover it exactly once, and each rank's fragments fit its shard's tensors.
//  - Files are opened only if they are regular files (a FIFO would block the load forever), and
//    JSON is parsed with bounded depth (zeal/core/json.h).
// Checkpoints of version 1 (no checksums or save ids) still load; their integrity is what their
// per-tensor CRC32s give.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace zeal::checkpoint {

// The whole file, if `path` is a regular file of at most max_bytes; else CheckpointError naming
// it (missing, a directory, a FIFO or device, too large). Never blocks on a special file.
std::string read_regular_file(const std::string& path, size_t max_bytes, const std::string& what);

// `text` (the content of `path`) as JSON, or CheckpointError naming the file, the byte offset
// and the key path (bounded depth, no duplicate keys).
nlohmann::json parse_checkpoint_json(std::string_view text, const std::string& path);

// xxh64 of bytes, as 16 hex digits.
std::string digest_hex(std::string_view bytes);

// 32 random hex digits (the save's identity).
std::string new_save_id();

// A JSON document sealed with its checksum, as text to write (one entry per line).
std::string seal_json(nlohmann::json doc);
// Reads a sealed manifest: verifies the checksum when the document has one and returns the
// document without it; *sealed (if given) says whether it had one.
nlohmann::json read_sealed_json(const std::string& path, bool* sealed = nullptr);

// The tag `latest` in save_dir names: a plain directory name, or CheckpointError.
std::string read_latest(const std::string& save_dir);

}  // namespace zeal::checkpoint
