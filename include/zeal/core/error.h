// Zeal's error types. The policy is in docs/errors.md: caller mistakes raise typed errors
// with a message that says what was expected and what was given; bugs raise InternalError.
// Every error type maps to one Python exception class (python/src/bindings.cpp).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace zeal {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A config key with a wrong type, range or name, or an inconsistent combination of keys.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A collective failed: bad arguments, a backend error, or a broken communicator.
class CommError : public Error {
 public:
  using Error::Error;
};

// A collective did not complete within its timeout; the message names the op, the group and
// the ranks that never arrived.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};

class IoError : public Error {
 public:
  using Error::Error;
};

class CheckpointError : public Error {
 public:
  using Error::Error;
};

// A broken invariant inside Zeal: always a bug to report, never the user's fault.
class InternalError : public Error {
 public:
  using Error::Error;
};

namespace detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

[[noreturn]] void throw_internal(const char* file, int line, const char* cond, const std::string& msg);
[[noreturn]] void throw_check(const char* file, int line, const std::string& msg);

}  // namespace detail
}  // namespace zeal

// ZEAL_CHECK: a caller mistake; raises zeal::Error with the message and file:line.
#define ZEAL_CHECK(cond, ...)                                                           \
  do {                                                                                  \
    if (!(cond)) ::zeal::detail::throw_check(__FILE__, __LINE__, ::zeal::detail::concat(__VA_ARGS__)); \
  } while (0)

// ZEAL_CHECK_AS: the same with a chosen error type (ConfigError, CommError, ...).
#define ZEAL_CHECK_AS(ErrorType, cond, ...)                                                          \
  do {                                                                                               \
    if (!(cond)) throw ErrorType(::zeal::detail::concat(__VA_ARGS__, " (at ", __FILE__, ":", __LINE__, ")")); \
  } while (0)

// ZEAL_INTERNAL_ASSERT: a bug in Zeal; always compiled in.
#define ZEAL_INTERNAL_ASSERT(cond, ...)                                                          \
  do {                                                                                           \
    if (!(cond))                                                                                 \
      ::zeal::detail::throw_internal(__FILE__, __LINE__, #cond, ::zeal::detail::concat("", ##__VA_ARGS__)); \
  } while (0)
