#include "zeal/core/logging.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <unordered_map>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace zeal {
namespace {

struct LogState {
  std::mutex mutex;
  int rank = 0;
  std::unordered_map<std::string, std::shared_ptr<spdlog::logger>> loggers;
};

LogState& state() {
  static LogState s;
  return s;
}

spdlog::level::level_enum level_for(int rank) {
  if (const char* env = std::getenv("ZEAL_LOG_LEVEL")) return spdlog::level::from_str(env);
  return rank == 0 ? spdlog::level::info : spdlog::level::warn;
}

void configure(spdlog::logger& log, const std::string& layer, int rank) {
  log.set_pattern("[%H:%M:%S] [rank " + std::to_string(rank) + "] [" + layer + "] %^%l%$: %v");
  log.set_level(level_for(rank));
}

spdlog::logger& get(const std::string& layer) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.loggers.find(layer);
  if (it != s.loggers.end()) return *it->second;
  auto log = std::make_shared<spdlog::logger>("zeal." + layer, std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  configure(*log, layer, s.rank);
  return *s.loggers.emplace(layer, log).first->second;
}

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return spdlog::level::debug;
    case LogLevel::kInfo: return spdlog::level::info;
    case LogLevel::kWarn: return spdlog::level::warn;
    case LogLevel::kError: return spdlog::level::err;
  }
  return spdlog::level::info;
}

}  // namespace

bool log_enabled(const std::string& layer, LogLevel level) { return get(layer).should_log(to_spdlog(level)); }

void log_message(const std::string& layer, LogLevel level, const std::string& message) {
  get(layer).log(to_spdlog(level), "{}", message);
}

void set_log_rank(int rank) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.rank = rank;
  for (auto& [layer, log] : s.loggers) configure(*log, layer, rank);
}

std::string format_number(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), format, value);
  return buffer;
}

}  // namespace zeal
