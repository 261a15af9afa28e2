// Parsing untrusted JSON (configs, checkpoint manifests, shard headers) in one bounded pass.
//
// nlohmann::json::parse alone accepts what Zeal must refuse: duplicate keys (the last value
// silently wins), a NUL byte ends the input early (anything after it is ignored), and values
// nested arbitrarily deep, which its recursive dump() and Python's json module then overflow the
// stack on. parse_json reads the text once through a SAX handler that keeps the key path, so each
// refusal names where it happened: the key path and the byte offset.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace zeal {

// Deeper nesting than any config or manifest needs, far below what overflows a stack.
constexpr int kMaxJsonDepth = 128;

// Why parse_json refused a text: what is wrong, at which byte, under which key path
// ("zero_optimization.stage", "parameters[3].shape"; empty at the top level).
struct JsonProblem {
  static constexpr size_t kUnknownByte = static_cast<size_t>(-1);
  std::string what;
  size_t byte = kUnknownByte;
  std::string key_path;
  std::string describe() const;  // "at byte 12 (key 'a.b'): what"; parts unknown are left out
};

// Parses text, or returns false with `problem` set: invalid syntax or encoding (ill-formed
// UTF-8), a NUL byte, a duplicate key, nesting deeper than max_depth, or content after the value.
bool parse_json(std::string_view text, nlohmann::json& out, JsonProblem& problem, int max_depth = kMaxJsonDepth);

// DeepSpeed reads config files with hjson; the parts of it real configs use are JSON plus comments
// (#, //, /* */), trailing commas and Infinity. This returns the text with comments and trailing
// commas blanked, every byte offset kept, for parse_json to read strictly; with mark_infinity, a
// bare Infinity becomes the string kInfinityMarker (JSON has no infinite number; Config::parse_text
// turns the marker back into +inf). Other hjson syntax (quoteless strings and keys, optional
// commas) stays a parse error.
inline constexpr char kInfinityMarker[] = "\"\xE2\x88\x9E\"   ";  // "∞" and 3 blanks: 8 bytes, as Infinity
std::string relax_config_json(std::string_view text, bool mark_infinity = true);

// A value for an error message: short, single-line, never recursive beyond what parse_json
// allows (containers are summarised by size past max_chars).
std::string json_preview(const nlohmann::json& value, size_t max_chars = 60);

}  // namespace zeal
