// `lazyfs status MOUNTPOINT [--json]`: progress of a running mount.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "control.h"

namespace lazyfs::cli {
namespace {

struct StatusCli {
  std::string mountpoint;
  bool json = false;
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

int status_command(const StatusCli& cli) {
  std::string doc;
  if (auto st = query_control(cli.mountpoint, doc); !st.ok()) {
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
  for (const auto& f : j["files"]) {
    const bool sized = !f["size"].is_null();
    fmt::print("{:>10} / {:>10} fetched {:>10}{} {}\n", human(f["present_bytes"].get<uint64_t>()),
               sized ? human(f["size"].get<uint64_t>()) : "?",
               human(f["fetched_bytes"].get<uint64_t>()), f["stale"].get<bool>() ? " STALE" : "",
               f["path"].get<std::string>());
  }
  fmt::print(
      "total {} of {} present ({} fetched, {} written locally){}; source {} ({}); inflight {}, "
      "retries {}, errors {}\n",
      human(j["present_bytes"].get<uint64_t>()), human(j["total_bytes"].get<uint64_t>()),
      human(j["fetched_bytes"].get<uint64_t>()), human(j["local_bytes"].get<uint64_t>()),
      j["complete"].get<bool>() ? ", complete" : "", j["source"]["uri"].get<std::string>(),
      j["source"]["state"].get<std::string>(), j["inflight"].get<uint64_t>(),
      j["retries"].get<uint64_t>(), j["errors"].get<uint64_t>());
  return kExitOk;
}

}  // namespace

Runner add_status_command(CLI::App& app) {
  auto cli = std::make_shared<StatusCli>();
  auto* cmd = app.add_subcommand("status", "Show what a running mount has fetched");
  cmd->add_option("MOUNTPOINT", cli->mountpoint, "Mount point of a running lazyfs")->required();
  cmd->add_flag("--json", cli->json, "Print the daemon's JSON document");
  return [cli]() { return status_command(*cli); };
}

}  // namespace lazyfs::cli
