// `lazyfs status MOUNTPOINT [--json]`: progress of a running mount.
#include <unistd.h>

#include <fmt/core.h>
#include <chrono>
#include <thread>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "control.h"

namespace lazyfs::cli {
namespace {

struct StatusCli {
  std::string mountpoint;
  bool json = false;
  bool wait = false;
  bool no_files = false;
};

std::string human(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024 && u + 1 < std::size(units)) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.1f} {}", v, units[u]);
}

// Waits until every served file is wholly local (exit 0) or the fill stops
// on an error (exit 1, with the reason), showing progress on a terminal.
int wait_command(const StatusCli& cli) {
  const bool tty = ::isatty(STDOUT_FILENO) && !cli.json;
  bool told_no_fill = false;
  double last_present = -1;
  auto last_time = std::chrono::steady_clock::now();
  double rate = 0;
  while (true) {
    std::string doc;
    if (auto st = query_control(cli.mountpoint, doc, /*with_files=*/false); !st.ok()) {
      if (tty) fmt::print("\n");
      print_error(st.message());
      return kExitFailure;
    }
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(doc);
    } catch (const std::exception& e) {
      print_error(fmt::format("unreadable status from the daemon: {}", e.what()));
      return kExitFailure;
    }
    const auto total = static_cast<double>(j["total_bytes"].get<uint64_t>());
    const auto present = static_cast<double>(j["present_bytes"].get<uint64_t>());
    const auto& fill = j["fill"];
    const auto now = std::chrono::steady_clock::now();
    if (fill.value("enabled", false)) {
      rate = fill.value("rate_bytes_s", 0.0);
    } else if (last_present >= 0) {
      const double dt = std::chrono::duration<double>(now - last_time).count();
      if (dt > 0) rate = (present - last_present) / dt;
    }
    last_present = present;
    last_time = now;
    if (j["complete"].get<bool>()) {
      if (tty) fmt::print("\r\033[K");
      if (cli.json) {
        if (!cli.no_files) {
          if (auto st = query_control(cli.mountpoint, doc); !st.ok()) {
            print_error(st.message());
            return kExitFailure;
          }
        }
        fmt::print("{}\n", doc);
      } else {
        fmt::print("complete: every served file is local ({}); the source is no longer needed\n",
                   human(static_cast<uint64_t>(total)));
      }
      return kExitOk;
    }
    if (fill.value("state", "") == "failed") {
      if (tty) fmt::print("\n");
      print_error(fmt::format(
          "fill stopped with {} of {} local: {}", human(static_cast<uint64_t>(present)),
          human(static_cast<uint64_t>(total)), fill.value("error", std::string("unknown error"))));
      return kExitFailure;
    }
    if (!fill.value("enabled", false) && !told_no_fill) {
      told_no_fill = true;
      fmt::print(stderr,
                 "lazyfs: note: this mount has no --fill; waiting for reads to fetch the rest\n");
    }
    if (tty) {
      const double frac = total > 0 ? present / total : 1;
      const size_t width = 30;
      const auto done = std::min(width, static_cast<size_t>(frac * static_cast<double>(width)));
      const std::string eta =
          rate > 0 ? fmt::format("{:.0f} s", (total - present) / rate) : std::string("?");
      fmt::print("\r\033[K[{}{}] {:5.1f}% {} of {}  {}/s  ETA {}", std::string(done, '#'),
                 std::string(width - done, '.'), frac * 100, human(static_cast<uint64_t>(present)),
                 human(static_cast<uint64_t>(total)),
                 human(static_cast<uint64_t>(std::max(0.0, rate))), eta);
      std::fflush(stdout);
    }
    // The summary is cheap for the daemon (no per-file list): poll often, so
    // that the answer comes soon after the fill completes.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

int status_command(const StatusCli& cli) {
  if (cli.wait) return wait_command(cli);
  std::string doc;
  if (auto st = query_control(cli.mountpoint, doc, !cli.no_files); !st.ok()) {
    print_error(st.message());
    return kExitFailure;
  }
  if (cli.json) {
    fmt::print("{}\n", doc);
    return kExitOk;
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(doc);
  } catch (const std::exception& e) {
    print_error(fmt::format("unreadable status from the daemon: {}", e.what()));
    return kExitFailure;
  }
  for (const auto& f : j.value("files", nlohmann::json::array())) {
    const bool sized = !f["size"].is_null();
    fmt::print("{:>10} / {:>10} fetched {:>10}{} {}\n", human(f["present_bytes"].get<uint64_t>()),
               sized ? human(f["size"].get<uint64_t>()) : "?",
               human(f["fetched_bytes"].get<uint64_t>()), f["stale"].get<bool>() ? " STALE" : "",
               f["path"].get<std::string>());
  }
  fmt::print(
      "total {} of {} present ({} fetched, {} written locally){}; source {} ({}); inflight {}, "
      "retries {}, errors {}; fill: {}\n",
      human(j["present_bytes"].get<uint64_t>()), human(j["total_bytes"].get<uint64_t>()),
      human(j["fetched_bytes"].get<uint64_t>()), human(j["local_bytes"].get<uint64_t>()),
      j["complete"].get<bool>() ? ", complete" : "", j["source"]["uri"].get<std::string>(),
      j["source"]["state"].get<std::string>(), j["inflight"].get<uint64_t>(),
      j["retries"].get<uint64_t>(), j["errors"].get<uint64_t>(),
      j["fill"].value("enabled", false)
          ? fmt::format("{} at {}/s", j["fill"].value("state", std::string("?")),
                        human(static_cast<uint64_t>(j["fill"].value("rate_bytes_s", 0.0))))
          : std::string("off"));
  return kExitOk;
}

}  // namespace

Runner add_status_command(CLI::App& app) {
  auto cli = std::make_shared<StatusCli>();
  auto* cmd = app.add_subcommand("status", "Show what a running mount has fetched");
  cmd->add_option("MOUNTPOINT", cli->mountpoint, "Mount point of a running lazyfs")->required();
  cmd->add_flag("--json", cli->json, "Print the daemon's JSON document");
  cmd->add_flag("--no-files", cli->no_files,
                "Leave out the per-file list: totals only, cheap on checkpoints with many files");
  cmd->add_flag("--wait", cli->wait,
                "Wait until every served file is local and recorded so on disk (exit 0: the "
                "source is no longer needed) or the fill fails (exit 1), with a progress bar on a "
                "terminal");
  return [cli]() { return status_command(*cli); };
}

}  // namespace lazyfs::cli
