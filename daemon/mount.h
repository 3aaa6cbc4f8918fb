// A running lazyfs mount: the catalog, the source, the cache, the fetch
// engine, the inode tree and the FUSE session, started in that order and
// stopped in reverse. Used by `lazyfs mount`.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lazyfs/catalog.h"
#include "lazyfs/engine.h"
#include "lazyfs/sftp_source.h"
#include "lazyfs/source.h"
#include "lazyfs/trace.h"

namespace lazyfs::cli {

struct MountOptions {
  std::filesystem::path mountpoint;
  std::filesystem::path image_dir;
  std::string source;               // [USER@]HOST, sftp://..., http(s)://..., file:///DIR
  std::filesystem::path cache_dir;  // empty: the default for this user
  uint64_t block_size = EngineOptions{}.block_size;
  unsigned connections = 4;
  std::vector<std::string> identity_files;
  std::string known_hosts;
  std::string ca_file;  // https: trust these CAs instead of the system's
  bool accept_new_host_key = false;
  bool insecure_no_host_key_check = false;
  SshClient ssh_client = SshClient::kOpenSsh;
  std::string ssh_command = "ssh";
  std::vector<std::string> ssh_options;
  std::chrono::milliseconds timeout{30000};  // retry budget of a request
  std::chrono::milliseconds stall_timeout{10000};
  bool foreground = false;
  bool read_only = false;
  bool compat_names = false;
  std::vector<std::string> fuse_options;  // -o
  std::filesystem::path log_file;         // empty: stderr, or CACHE_DIR/lazyfs.log when detached
  bool fill = false;                      // fetch everything in the background
  uint64_t fill_rate = 0;                 // bytes per second, 0: no cap
  uint64_t fill_alongside = 0;            // bytes in flight while readers miss
  bool fill_adapt = false;                // ... only while that serves them as fast
  std::filesystem::path record_trace;     // write the first reads here
  std::chrono::seconds trace_seconds{60};
  std::vector<TraceRecord> prefetch;           // blocks to fetch right after mount
  std::chrono::milliseconds prefetch_wait{0};  // return once they are local (bounded)
};

// The default cache directory: /var/cache/lazyfs for root, else
// $XDG_CACHE_HOME/lazyfs or ~/.cache/lazyfs.
std::filesystem::path default_cache_dir();

// Makes the source named by `uri` (file:///DIR, sftp://..., [USER@]HOST,
// http://... or https://...).
std::unique_ptr<Source> make_source(const std::string& uri, const MountOptions& options,
                                    Status& status);

// Whether `path` is a mount point now (from /proc/self/mountinfo).
bool is_mount_point(const std::filesystem::path& path);

// Checks the mount point: exists, is a directory, is not busy. A stale FUSE
// mount left by a killed daemon (ENOTCONN) is detached, with a message.
Status check_mountpoint(const std::filesystem::path& mountpoint);

// Runs the mount until it is unmounted or signalled. `ready` is called once
// the mount serves (or with the reason it could not start). Returns the exit
// status.
int run_mount(const MountOptions& options, const Catalog& catalog,
              const std::function<void(const Status&)>& ready);

}  // namespace lazyfs::cli
