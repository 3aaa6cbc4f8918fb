// The control socket of a running mount: `lazyfs status` connects to it,
// sends one byte ('f': the whole document, 's': without the per-file list)
// and reads one JSON document. A Unix socket named from the mount point, under
// /run/lazyfs (root) or $XDG_RUNTIME_DIR/lazyfs, mode 0600.
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>

#include "lazyfs/fileio.h"
#include "lazyfs/status.h"

namespace lazyfs::cli {

// Where the control socket of a mount at `mountpoint` lives.
std::filesystem::path control_socket_path(const std::filesystem::path& mountpoint);

// Serves `render()` to each client on its own thread until destroyed.
class ControlServer {
 public:
  // `render(with_files)` makes the document.
  ControlServer(std::filesystem::path path, std::function<std::string(bool)> render,
                Status& status);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

 private:
  void serve();

  std::filesystem::path path_;
  std::function<std::string(bool)> render_;
  UniqueFd listen_fd_;
  UniqueFd wake_read_, wake_write_;
  std::thread thread_;
};

// Reads the document from a running mount's socket, with or without the
// per-file list.
Status query_control(const std::filesystem::path& mountpoint, std::string& out,
                     bool with_files = true);

}  // namespace lazyfs::cli
