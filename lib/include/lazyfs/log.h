// One process-wide logger: a level, a subsystem per line and key=value fields,
// written to stderr unless an embedder installs its own sink. Formatting is
// done only when the line passes the level, so disabled debug lines are cheap.
#pragma once

#include <fmt/core.h>

#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace lazyfs::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

// Receives every line that passes the level. Called from any thread; a sink
// must be thread-safe and must not throw.
using Sink = std::function<void(Level, std::string_view subsystem, std::string_view message)>;

void set_level(Level level);
Level level();
// An empty sink restores the default (stderr, one line per message).
void set_sink(Sink sink);

std::string_view level_name(Level level);
// The default sink's line: local time to the millisecond, level, subsystem,
// message and a newline. With a pid, "[PID] " after the time: for a log file
// that several processes write (the daemons of one cache directory).
std::string format_line(Level level, std::string_view subsystem, std::string_view message,
                        std::optional<long> pid = std::nullopt);
std::optional<Level> parse_level(std::string_view name);

void emit(Level level, std::string_view subsystem, std::string_view message);

template <typename... Args>
void write(Level lvl, std::string_view subsystem, fmt::format_string<Args...> format,
           Args&&... args) {
  if (lvl < level()) return;
  emit(lvl, subsystem, fmt::format(format, std::forward<Args>(args)...));
}

template <typename... Args>
void debug(std::string_view subsystem, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::kDebug, subsystem, format, std::forward<Args>(args)...);
}
template <typename... Args>
void info(std::string_view subsystem, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::kInfo, subsystem, format, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(std::string_view subsystem, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::kWarn, subsystem, format, std::forward<Args>(args)...);
}
template <typename... Args>
void error(std::string_view subsystem, fmt::format_string<Args...> format, Args&&... args) {
  write(Level::kError, subsystem, format, std::forward<Args>(args)...);
}

}  // namespace lazyfs::log
