// lazyfs: the command on the restore host. Dispatches to the subcommands.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "commands.h"

namespace lazyfs::cli {

void print_error(const std::string& message) {
  std::fprintf(stderr, "lazyfs: %s\n", message.c_str());
}

namespace {

int run(int argc, char** argv) {
  CLI::App app{
      "lazyfs: serve a CRIU checkpoint's files on the restore host, fetching only the byte "
      "ranges the restored process reads.",
      "lazyfs"};
  app.set_version_flag("--version", std::string("lazyfs ") + LAZYFS_VERSION);
  app.require_subcommand(1);
  app.footer(
      "`lazyfs MOUNTPOINT IMGDIR USER@HOST` (the original LazyFS form) means `lazyfs mount "
      "MOUNTPOINT IMGDIR USER@HOST`.\nRun `lazyfs SUBCOMMAND --help` for a subcommand's options; "
      "docs/usage.md walks through a migration.");

  std::vector<std::pair<CLI::App*, Runner>> commands;
  auto add = [&](Runner runner) { commands.emplace_back(app.get_subcommands({}).back(), runner); };
  add(add_ls_command(app));
  add(add_mount_command(app));
  add(add_prepare_command(app));
  add(add_status_command(app));

  // The original LazyFS form, `lazyfs MOUNTPOINT IMGDIR USER@RHOST`, means
  // `lazyfs mount MOUNTPOINT IMGDIR USER@RHOST`.
  std::vector<std::string> args(argv + 1, argv + argc);
  const auto subcommands = app.get_subcommands({});
  const bool named = std::any_of(subcommands.begin(), subcommands.end(), [&](CLI::App* sub) {
    return !args.empty() && sub->check_name(args[0]);
  });
  if (args.size() == 3 && args[0].rfind('-', 0) != 0 && !named) {
    args.insert(args.begin(), "mount");
  }
  std::reverse(args.begin(), args.end());  // CLI11 takes them last-first
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    print_error(e.what());
    std::fprintf(stderr, "Run with --help for more information.\n");
    return kExitBadInput;
  }
  for (auto& [sub, runner] : commands) {
    if (sub->parsed()) return runner();
  }
  return kExitBadInput;
}

}  // namespace
}  // namespace lazyfs::cli

int main(int argc, char** argv) {
  try {
    return lazyfs::cli::run(argc, argv);
  } catch (const std::exception& e) {
    lazyfs::cli::print_error(e.what());
    return lazyfs::cli::kExitFailure;
  }
}
