// Named loggers per layer ("core", "comm", "optim", "engine") so a user can turn on just one.
// Rank 0 logs info by default; every rank logs warnings and errors. ZEAL_LOG_LEVEL (debug,
// info, warn, error) sets the level on every rank. Backed by spdlog; this header keeps spdlog
// (and its fmt) out of translation units that also see torch's bundled fmt.
#pragma once

#include <string>

#include "zeal/core/error.h"

namespace zeal {

enum class LogLevel { kDebug = 1, kInfo = 2, kWarn = 3, kError = 4 };

bool log_enabled(const std::string& layer, LogLevel level);
void log_message(const std::string& layer, LogLevel level, const std::string& message);

// Called once the process knows its rank: it enters every line's prefix and sets the default level.
void set_log_rank(int rank);

template <typename... Args>
void log(const std::string& layer, LogLevel level, const Args&... args) {
  if (log_enabled(layer, level)) log_message(layer, level, detail::concat(args...));
}

// printf-style number formatting for log lines ("%.4f").
std::string format_number(const char* format, double value);

}  // namespace zeal
