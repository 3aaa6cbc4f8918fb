// `lazyfs prepare IMGDIR [--mountpoint DIR] [--all] [--undo]`: point the
// checkpoint's files image at the mount, so stock `criu restore` opens the
// files through lazyfs.
#include <fmt/core.h>

#include "commands.h"
#include "lazyfs/prepare.h"

namespace lazyfs::cli {
namespace {

struct PrepareCli {
  std::string image_dir;
  PrepareOptions opts;
  bool undo = false;
};

int prepare_command(const PrepareCli& cli) {
  try {
    if (cli.undo) {
      if (undo_prepare(cli.image_dir)) {
        fmt::print("restored the original files image of {}\n", cli.image_dir);
      } else {
        fmt::print("{} was not prepared by lazyfs; nothing to undo\n", cli.image_dir);
      }
      return kExitOk;
    }
    auto r = prepare_checkpoint(cli.image_dir, cli.opts);
    fmt::print(
        "{}: {} files and {} directories open through {}; {} files left at their local "
        "copies{}\n",
        r.changed ? "prepared" : "already prepared", r.files_redirected, r.dirs_redirected,
        cli.opts.mountpoint, r.left_alone,
        r.foreign_mounts
            ? fmt::format("; {} entries of other mount namespaces left alone", r.foreign_mounts)
            : "");
    return kExitOk;
  } catch (const std::exception& e) {
    print_error(e.what());
    return kExitBadInput;
  }
}

}  // namespace

Runner add_prepare_command(CLI::App& app) {
  auto cli = std::make_shared<PrepareCli>();
  auto* cmd = app.add_subcommand(
      "prepare", "Rewrite the checkpoint so `criu restore` opens missing files through the mount");
  cmd->add_option("IMGDIR", cli->image_dir, "CRIU image directory")->required();
  cmd->add_option("--mountpoint", cli->opts.mountpoint,
                  "Where lazyfs is (or will be) mounted (default /lazyfs)");
  cmd->add_flag("--all", cli->opts.all,
                "Redirect every served file, also those this host already has");
  cmd->add_flag("--undo", cli->undo, "Put the original files image back");
  return [cli]() { return prepare_command(*cli); };
}

}  // namespace lazyfs::cli
