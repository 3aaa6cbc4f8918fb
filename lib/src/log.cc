#include "lazyfs/log.h"

#include <fmt/chrono.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>

namespace lazyfs::log {
namespace {

std::atomic<Level> g_level{Level::kInfo};
std::mutex g_sink_mutex;
Sink g_sink;  // guarded by g_sink_mutex; empty means stderr

void write_stderr(Level lvl, std::string_view subsystem, std::string_view message) {
  const auto line = format_line(lvl, subsystem, message);
  // One fwrite per line keeps lines from different threads whole.
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace

void set_level(Level level) {
  g_level.store(level, std::memory_order_relaxed);
}
Level level() {
  return g_level.load(std::memory_order_relaxed);
}

void set_sink(Sink sink) {
  std::lock_guard lock(g_sink_mutex);
  g_sink = std::move(sink);
}

std::string_view level_name(Level level) {
  switch (level) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kWarn:
      return "warn";
    case Level::kError:
      return "error";
    case Level::kOff:
      return "off";
  }
  return "?";
}

std::string format_line(Level lvl, std::string_view subsystem, std::string_view message,
                        std::optional<long> pid) {
  const auto now = std::chrono::system_clock::now();
  const auto seconds = std::chrono::floor<std::chrono::seconds>(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - seconds).count();
  const auto who = pid ? fmt::format("[{}] ", *pid) : std::string();
  return fmt::format("{:%Y-%m-%dT%H:%M:%S}.{:03} {}{} {}: {}\n", seconds, ms, who, level_name(lvl),
                     subsystem, message);
}

std::optional<Level> parse_level(std::string_view name) {
  for (auto l : {Level::kDebug, Level::kInfo, Level::kWarn, Level::kError, Level::kOff}) {
    if (name == level_name(l)) return l;
  }
  if (name == "warning") return Level::kWarn;
  return std::nullopt;
}

void emit(Level lvl, std::string_view subsystem, std::string_view message) {
  std::lock_guard lock(g_sink_mutex);
  if (g_sink) {
    g_sink(lvl, subsystem, message);
  } else {
    write_stderr(lvl, subsystem, message);
  }
}

}  // namespace lazyfs::log
