#include "zeal/core/error.h"

namespace zeal::detail {

void throw_internal(const char* file, int line, const char* cond, const std::string& msg) {
  throw InternalError(concat("internal error (a Zeal bug, please report it) at ", file, ":", line,
                             ": ", cond, msg.empty() ? "" : ": ", msg));
}

void throw_check(const char* file, int line, const std::string& msg) {
  throw Error(concat(msg, " (at ", file, ":", line, ")"));
}

}  // namespace zeal::detail
