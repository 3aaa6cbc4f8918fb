// `lazyfs ls IMGDIR [--json]`: the files a restore of this checkpoint needs.
#include <fmt/core.h>

#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "lazyfs/catalog.h"
#include "lazyfs/image.h"

namespace lazyfs::cli {
namespace {

struct LsOptions {
  std::string image_dir;
  bool json = false;
};

nlohmann::json to_json(const Catalog& cat) {
  auto files = nlohmann::json::array();
  for (const auto& f : cat.files()) {
    auto ids = nlohmann::json::array();
    auto openers = nlohmann::json::array();
    for (const auto& o : f.openers) {
      ids.push_back(o.id);
      openers.push_back({{"id", o.id}, {"flags", o.flags}, {"pos", o.pos}});
    }
    files.push_back({{"path", f.path},
                     {"size", f.size ? nlohmann::json(*f.size) : nlohmann::json(nullptr)},
                     {"mode", f.mode ? nlohmann::json(*f.mode) : nlohmann::json(nullptr)},
                     {"ids", ids},
                     {"openers", openers},
                     {"build_id", f.has_build_id},
                     {"local", exists_locally(f)}});
  }
  auto dirs = nlohmann::json::array();
  for (const auto& d : cat.dirs()) {
    dirs.push_back({{"path", d.path}, {"mode", d.mode}, {"local", exists_locally(d)}});
  }
  auto skipped = nlohmann::json::array();
  for (const auto& s : cat.skipped()) {
    nlohmann::json j{{"id", s.id}, {"path", s.path}, {"reason", s.reason}};
    if (!s.detail.empty()) j["detail"] = s.detail;
    skipped.push_back(std::move(j));
  }
  return {{"checkpoint", cat.identity()},
          {"files", files},
          {"dirs", dirs},
          {"skipped", skipped},
          {"total_bytes", cat.total_bytes()}};
}

void print_table(const Catalog& cat) {
  size_t local = 0;
  for (const auto& f : cat.files()) {
    const bool here = exists_locally(f);
    local += here;
    fmt::print(
        "{} {:>12} {} {}\n", f.mode ? mode_string(*f.mode) : "?---------",
        f.size ? std::to_string(*f.size) : "-", f.path,
        here ? "(local)" : (f.size ? "(missing)" : "(missing; size not recorded: O_APPEND)"));
  }
  for (const auto& d : cat.dirs()) {
    fmt::print("{} {:>12} {} {}\n", mode_string(d.mode), "dir", d.path,
               exists_locally(d) ? "(local)" : "(missing)");
  }
  std::map<std::string, size_t> by_reason;
  for (const auto& s : cat.skipped()) {
    ++by_reason[s.reason];
    if (s.reason == "invalid-path" || s.reason == "conflict") {
      fmt::print(stderr, "lazyfs: skipped id {}: {}\n", s.id, s.detail);
    }
  }
  std::string skipped;
  for (const auto& [reason, n] : by_reason) {
    skipped += fmt::format("{}{} {}", skipped.empty() ? "" : ", ", n, reason);
  }
  fmt::print("{} files, {} bytes, {} present locally; {} dirs; skipped: {}\n", cat.files().size(),
             cat.total_bytes(), local, cat.dirs().size(), skipped.empty() ? "none" : skipped);
}

}  // namespace

Runner add_ls_command(CLI::App& app) {
  auto opts = std::make_shared<LsOptions>();
  auto* cmd = app.add_subcommand("ls", "List the files a restore of the checkpoint will open");
  cmd->add_option("IMGDIR", opts->image_dir, "CRIU image directory (criu dump -D)")->required();
  cmd->add_flag("--json", opts->json, "Print one JSON object instead of a table");
  return [opts]() {
    try {
      auto cat = Catalog::load(opts->image_dir);
      if (opts->json) {
        fmt::print("{}\n", to_json(cat).dump(2));
      } else {
        print_table(cat);
      }
      return kExitOk;
    } catch (const ImageError& e) {
      print_error(e.what());
      return kExitBadInput;
    } catch (const std::runtime_error& e) {
      print_error(e.what());
      return kExitBadInput;
    }
  };
}

}  // namespace lazyfs::cli
