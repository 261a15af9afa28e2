#include "zeal/core/json.h"

#include <cctype>
#include <cmath>
#include <cstring>
#include <vector>

namespace zeal {
namespace {

using json = nlohmann::json;

// Builds the document on an explicit stack (no recursion), refusing duplicate keys and depth.
class StrictHandler : public nlohmann::json_sax<json> {
 public:
  StrictHandler(json& root, JsonProblem& problem, int max_depth, std::string_view text)
      : root_(root), problem_(problem), max_depth_(max_depth), text_(text) {}

  bool null() override { return put(json(nullptr)); }
  bool boolean(bool v) override { return put(json(v)); }
  bool number_integer(number_integer_t v) override { return put(json(v)); }
  bool number_unsigned(number_unsigned_t v) override { return put(json(v)); }
  bool number_float(number_float_t v, const string_t&) override { return put(json(v)); }
  bool string(string_t& v) override { return put(json(std::move(v))); }
  bool binary(binary_t& v) override { return put(json::binary(std::move(v))); }

  bool start_object(std::size_t) override { return open(json::object()); }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(json::array()); }
  bool end_array() override { return close(); }

  bool key(string_t& k) override {
    Frame& f = stack_.back();
    if (f.value->contains(k)) {
      f.key = k;
      return fail("duplicate key '" + k + "' (JSON objects must not repeat a key; the value would be ambiguous)");
    }
    f.key = std::move(k);
    return true;
  }

  bool parse_error(std::size_t position, const std::string& last_token, const nlohmann::detail::exception& ex) override {
    if (failed_) return false;  // our own refusal, already described
    std::string what = ex.what();
    // "[json.exception.parse_error.101] parse error at line 1, column 5: syntax error while parsing value - ..."
    auto dash = what.find(" - ");
    std::string reason = dash == std::string::npos ? what : what.substr(dash + 3);
    // "...; last read: '<raw bytes>'" may hold ill-formed UTF-8, which no message may carry.
    if (size_t last = reason.find("; last read:"); last != std::string::npos) reason.resize(last);
    std::string token = last_token.size() > 40 ? last_token.substr(0, 40) + "..." : last_token;
    // The lexer stops a few bytes into the literal: look back to where it starts.
    size_t from = position > 0 ? position - 1 : 0;
    while (from > 0 && std::isalpha(static_cast<unsigned char>(text_[from - 1]))) --from;
    std::string_view at = from < text_.size() ? text_.substr(from) : std::string_view();
    if (token.rfind("N", 0) == 0 || token.rfind("I", 0) == 0 || token.rfind("-I", 0) == 0 || at.rfind("NaN", 0) == 0 ||
        at.rfind("Infinity", 0) == 0 || at.rfind("nan", 0) == 0 || at.rfind("inf", 0) == 0)
      reason = "NaN and Infinity are not JSON numbers (write a finite number)";
    set(reason, position > 0 ? position - 1 : 0);
    return false;
  }

  bool failed() const { return failed_; }

 private:
  struct Frame {
    json* value;
    std::string key;  // the object's current key
  };

  std::string path() const {
    std::string p;
    for (const Frame& f : stack_) {
      if (f.value->is_object()) {
        if (f.key.empty() && &f == &stack_.back()) break;
        p += (p.empty() ? "" : ".") + (f.key.size() > 60 ? f.key.substr(0, 60) + "..." : f.key);
      } else {
        p += "[" + std::to_string(f.value->empty() ? 0 : f.value->size() - 1) + "]";
      }
    }
    return p;
  }

  void set(const std::string& what, size_t byte) {
    if (failed_) return;
    failed_ = true;
    problem_.what = what;
    problem_.byte = byte;
    problem_.key_path = path();
    if (problem_.key_path.size() > 120) problem_.key_path = problem_.key_path.substr(0, 117) + "...";
  }

  bool fail(const std::string& what) {
    set(what, byte_);
    return false;
  }

  // The slot a new value goes into: the root, an array's end, or an object's current key.
  json* slot() {
    if (stack_.empty()) return &root_;
    Frame& f = stack_.back();
    if (f.value->is_array()) {
      f.value->push_back(nullptr);
      return &f.value->back();
    }
    return &(*f.value)[f.key];
  }

  bool put(json v) {
    *slot() = std::move(v);
    return true;
  }

  bool open(json v) {
    if (static_cast<int>(stack_.size()) >= max_depth_)
      return fail("nested deeper than " + std::to_string(max_depth_) + " levels");
    json* s = slot();
    *s = std::move(v);
    stack_.push_back({s, {}});
    return true;
  }

  bool close() {
    stack_.pop_back();
    return true;
  }

  json& root_;
  JsonProblem& problem_;
  int max_depth_;
  std::string_view text_;
  std::vector<Frame> stack_;
  bool failed_ = false;
  size_t byte_ = JsonProblem::kUnknownByte;
};

}  // namespace

std::string JsonProblem::describe() const {
  std::string out;
  if (byte != kUnknownByte) out = "at byte " + std::to_string(byte);
  if (!key_path.empty()) out += std::string(out.empty() ? "" : " ") + "(key '" + key_path + "')";
  return out.empty() ? what : out + ": " + what;
}

bool parse_json(std::string_view text, json& out, JsonProblem& problem, int max_depth) {
  // nlohmann's lexer takes a NUL byte for the end of the input; JSON text never holds one.
  const void* nul = std::memchr(text.data(), '\0', text.size());
  std::string_view head = nul ? text.substr(0, static_cast<const char*>(nul) - text.data()) : text;
  out = json();
  StrictHandler handler(out, problem, max_depth, head);
  bool ok = json::sax_parse(head.begin(), head.end(), &handler, json::input_format_t::json, /*strict=*/true);
  if (!ok) {
    if (!handler.failed()) problem = {"not valid JSON", 0, {}};
    // Duplicate keys and depth are refused inside SAX callbacks, which know no byte offset: the
    // key path names the place.
    out = json();
    return false;
  }
  if (nul) {
    problem = {"a NUL byte after the JSON value (the file is corrupted or not text)",
               static_cast<size_t>(static_cast<const char*>(nul) - text.data()), {}};
    out = json();
    return false;
  }
  return true;
}

std::string relax_config_json(std::string_view text, bool mark_infinity) {
  // One pass with a small state machine; every change keeps the length, so byte offsets in later
  // messages still point into the user's file.
  std::string out(text);
  const size_t n = out.size();
  size_t i = 0;
  size_t last_comma = std::string::npos;  // an unquoted comma with only blanks and comments since
  auto blank = [&](size_t from, size_t to) {
    for (size_t k = from; k < to && k < n; ++k)
      if (out[k] != '\n' && out[k] != '\r') out[k] = ' ';
  };
  while (i < n) {
    const char c = out[i];
    if (c == '"') {  // a string: skip to its closing quote, past escapes
      last_comma = std::string::npos;
      for (++i; i < n && out[i] != '"'; ++i)
        if (out[i] == '\\') ++i;
      ++i;
      continue;
    }
    if (c == '#' || (c == '/' && i + 1 < n && out[i + 1] == '/')) {  // a line comment
      size_t end = out.find('\n', i);
      if (end == std::string::npos) end = n;
      blank(i, end);
      i = end;
      continue;
    }
    if (c == '/' && i + 1 < n && out[i + 1] == '*') {  // a block comment (unterminated: left for the parser)
      size_t end = out.find("*/", i + 2);
      if (end == std::string::npos) break;
      blank(i, end + 2);
      i = end + 2;
      continue;
    }
    if (c == ',') {
      last_comma = i;
      ++i;
      continue;
    }
    if ((c == '}' || c == ']') && last_comma != std::string::npos) {
      out[last_comma] = ' ';  // a trailing comma
      last_comma = std::string::npos;
      ++i;
      continue;
    }
    if (c == 'I' && mark_infinity && out.compare(i, 8, "Infinity") == 0) {
      out.replace(i, 8, kInfinityMarker);
      last_comma = std::string::npos;
      i += 8;
      continue;
    }
    if (!std::isspace(static_cast<unsigned char>(c))) last_comma = std::string::npos;
    ++i;
  }
  return out;
}

std::string json_preview(const json& value, size_t max_chars) {
  std::string text;
  if (value.is_number_float() && std::isinf(value.get<double>())) return value.get<double>() > 0 ? "Infinity" : "-Infinity";
  if (value.is_string()) {
    const std::string& s = value.get_ref<const std::string&>();
    text = json(s.size() > max_chars ? s.substr(0, max_chars) : s).dump(-1, ' ', false, json::error_handler_t::replace);
    if (s.size() > max_chars) text += "... (" + std::to_string(s.size()) + " chars)";
    return text;
  }
  if (value.is_structured() && value.size() > 16)
    return std::string(value.is_object() ? "an object of " : "an array of ") + std::to_string(value.size()) +
           " entries";
  text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > max_chars) text = text.substr(0, max_chars) + "...";
  return text;
}

}  // namespace zeal
