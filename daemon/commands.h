// The lazyfs subcommands. Each registers its options on the CLI11 app and
// returns the process exit status when run: 0 on success, 1 for a runtime
// failure, 2 for bad input (arguments, checkpoint images).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace lazyfs::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitBadInput = 2;

// Adds a subcommand to `app`; the returned function runs it after parsing.
using Runner = std::function<int()>;
Runner add_ls_command(CLI::App& app);
Runner add_mount_command(CLI::App& app);
Runner add_prepare_command(CLI::App& app);
Runner add_status_command(CLI::App& app);

// Prints "lazyfs: MESSAGE" on stderr.
void print_error(const std::string& message);

}  // namespace lazyfs::cli
