#include "mount.h"

#include <pwd.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "lazyfs/cache.h"
#include "lazyfs/filesystem.h"
#include "lazyfs/log.h"
#include "lazyfs/open_source.h"

namespace lazyfs::cli {

std::filesystem::path default_cache_dir() {
  if (const char* env = std::getenv("LAZYFS_CACHE_DIR"); env && *env) return env;
  if (::geteuid() == 0) return "/var/cache/lazyfs";
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    return std::filesystem::path(xdg) / "lazyfs";
  }
  const char* home = std::getenv("HOME");
  if (!home || !*home) {
    if (const passwd* pw = ::getpwuid(::geteuid())) home = pw->pw_dir;
  }
  return std::filesystem::path(home ? home : "/tmp") / ".cache" / "lazyfs";
}

std::unique_ptr<Source> make_source(const std::string& uri, const MountOptions& options,
                                    Status& status) {
  SourceOptions so;
  so.connections = options.connections;
  so.identity_files = options.identity_files;
  so.known_hosts = options.known_hosts;
  so.ca_file = options.ca_file;
  so.host_key_policy = options.insecure_no_host_key_check ? HostKeyPolicy::kInsecure
                       : options.accept_new_host_key      ? HostKeyPolicy::kAcceptNew
                                                          : HostKeyPolicy::kStrict;
  so.stall_timeout = options.stall_timeout;
  so.ssh_client = options.ssh_client;
  so.ssh_command = options.ssh_command;
  so.ssh_options = options.ssh_options;
  return open_source(uri, so, status);
}

bool is_mount_point(const std::filesystem::path& path) {
  std::ifstream in("/proc/self/mountinfo");
  const auto want = std::filesystem::absolute(path).lexically_normal().string();
  std::string line;
  while (std::getline(in, line)) {
    // Fields: id parent major:minor root mountpoint ...; spaces in paths are \040.
    size_t pos = 0;
    for (int i = 0; i < 4 && pos != std::string::npos; ++i) pos = line.find(' ', pos + 1);
    if (pos == std::string::npos) continue;
    auto end = line.find(' ', pos + 1);
    std::string mp = line.substr(pos + 1, end - pos - 1);
    std::string decoded;
    for (size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        decoded += static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8));
        i += 3;
      } else {
        decoded += mp[i];
      }
    }
    if (decoded == want) return true;
  }
  return false;
}

Status check_mountpoint(const std::filesystem::path& mountpoint) {
  struct stat st;
  if (::stat(mountpoint.c_str(), &st) != 0) {
    if (errno == ENOTCONN || errno == ECONNABORTED) {
      // A FUSE mount whose daemon died: detach it and mount over a clean dir.
      log::warn("mount", "replacing a stale lazyfs mount at {} left by a daemon that exited",
                mountpoint.string());
      fmt::print(stderr, "lazyfs: replacing a stale mount at {}\n", mountpoint.string());
      if (::umount2(mountpoint.c_str(), MNT_DETACH) != 0) {
        std::string cmd = "fusermount3 -u -z -- '" + mountpoint.string() + "' 2>/dev/null";
        if (std::system(cmd.c_str()) != 0) {
          return Status::permanent(EBUSY, fmt::format("mount point {} holds a stale mount that "
                                                      "cannot be detached",
                                                      mountpoint.string()));
        }
      }
      if (::stat(mountpoint.c_str(), &st) != 0) {
        return Status::permanent(
            errno, fmt::format("mount point {}: {}", mountpoint.string(), std::strerror(errno)));
      }
    } else {
      return Status::permanent(
          errno, fmt::format("mount point {}: {}", mountpoint.string(), std::strerror(errno)));
    }
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::permanent(ENOTDIR,
                             fmt::format("mount point {} is not a directory", mountpoint.string()));
  }
  if (is_mount_point(mountpoint)) {
    return Status::permanent(EBUSY, fmt::format("mount point {} is busy: something is already "
                                                "mounted there",
                                                mountpoint.string()));
  }
  return {};
}

// Whether the cache holds every file of the checkpoint whole, as the maps on
// disk say: then the mount needs no source.
bool cache_holds_all(const std::filesystem::path& dir, const Catalog& catalog) {
  Status st;
  auto cache = BlockCache::open(dir, catalog.identity(), st);
  if (!cache) return false;
  return std::all_of(catalog.files().begin(), catalog.files().end(), [&](const auto& f) {
    return cache->wholly_present_file(f.path, f.size) != nullptr;
  });
}

namespace {

// Raises the soft limit on open files to the hard one, as daemons that hold
// many files do: the default soft limit (1,024) is kept low for programs
// that still use select(), which lazyfs does not. The cache keeps a quarter
// of the limit open, and as many of the files created in the mount.
void raise_open_file_limit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return;
  const rlim_t old = rl.rlim_cur;
  rl.rlim_cur = rl.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  log::debug("mount", "open file limit raised from={} to={}", old, rl.rlim_cur);
}

}  // namespace

int run_mount(const MountOptions& options, const Catalog& catalog,
              const std::function<void(const Status&)>& ready) {
  raise_open_file_limit();
  FilesystemOptions fo;
  fo.cache_dir = options.cache_dir.empty() ? default_cache_dir() : options.cache_dir;
  Status st;
  auto source = std::shared_ptr<Source>(make_source(options.source, options, st));
  Status unreachable;
  if (!source && st.errnum() != EINVAL && cache_holds_all(fo.cache_dir, catalog)) {
    // Released after a completed fill, say: the cache is the whole copy.
    unreachable = st;
    // Detached, the log (below) goes to a file: the terminal hears it here.
    if (!options.foreground) {
      fmt::print(stderr,
                 "lazyfs: {}; every file is wholly in the cache, serving them without the "
                 "source\n",
                 st.message());
    }
    source = make_unreachable_source(options.source, st);
  }
  if (!source) {
    ready(st);
    return 1;
  }
  fo.engine.block_size = options.block_size;
  fo.engine.retry_budget = options.timeout;
  fo.read_only = options.read_only;
  fo.compat_names = options.compat_names;
  fo.allow_other = ::geteuid() == 0;
  fo.fuse_options = options.fuse_options;
  fo.fill = options.fill;
  fo.fill_rate = options.fill_rate;
  fo.fill_alongside = options.fill_alongside;
  fo.fill_adapt = options.fill_adapt;
  fo.record_trace = options.record_trace;
  fo.trace_seconds = options.trace_seconds;
  fo.prefetch = options.prefetch;
  fo.prefetch_wait = options.prefetch_wait;
  auto fs = Filesystem::create(catalog, std::move(source), std::move(fo), st);
  if (!fs) {
    ready(st);
    return 1;
  }
  st = fs->mount(options.mountpoint);
  if (st.ok()) st = fs->handle_signals();
  ready(st);
  if (!st.ok()) return st.errnum() == EINVAL ? 2 : 1;
  if (!unreachable.ok()) {
    // Now that the log is where it stays.
    log::warn("mount",
              "source unreachable ({}); every file is wholly in the cache, serving "
              "them without it",
              unreachable.message());
  }
  const int rc = fs->serve();
  return rc < 0 ? 1 : 0;
}

}  // namespace lazyfs::cli
