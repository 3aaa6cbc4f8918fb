// lazyfs::Filesystem (liblazyfs-fuse): a checkpoint's files mounted with FUSE
// and fetched lazily, for embedding. `lazyfs mount` is a thin user of it.
//
//   auto fs = Filesystem::create(catalog, source, options, status);
//   fs->mount("/lazyfs");   // then fs->serve() here, or fs->start() in the background
//   ...
//   fs->stop();             // unmounts; also done by the destructor
//
// Several file systems may run in one process. Nothing here installs signal
// handlers or exits the process: errors come back as Status.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "lazyfs/catalog.h"
#include "lazyfs/engine.h"
#include "lazyfs/source.h"
#include "lazyfs/status.h"
#include "lazyfs/trace.h"

namespace lazyfs {

struct FilesystemOptions {
  std::filesystem::path cache_dir;  // required: fetched bytes and range maps (created 0700)
  EngineOptions engine;             // block size, retry budget, ...
  bool read_only = false;           // refuse every change with EROFS
  bool compat_names = false;        // also the LazyFS flat names at the root
  // allow_other + default_permissions, so restored processes of any user can
  // open the files under the recorded modes. Needs root (or user_allow_other).
  bool allow_other = true;
  std::vector<std::string> fuse_options;  // extra -o options
  bool fill = false;                      // fetch everything in the background
  uint64_t fill_rate = 0;                 // its bytes per second; 0: no cap
  uint64_t fill_alongside = 0;            // its bytes in flight while readers miss
  bool fill_adapt = false;                // ... only while that serves them as fast
  std::filesystem::path record_trace;     // record the first reads here
  std::chrono::seconds trace_seconds{60};
  std::vector<TraceRecord> prefetch;  // fetch these blocks right after mounting
  // If positive, mount() returns only once the prefetch is local, or after
  // this long, whichever comes first.
  std::chrono::milliseconds prefetch_wait{0};
  bool control_socket = true;  // serve `lazyfs status` for the mount point
};

class Filesystem {
 public:
  // Opens the cache and starts the engine (which validates every file against
  // the source in one batch). Null with `status` on failure.
  static std::unique_ptr<Filesystem> create(const Catalog& catalog, std::shared_ptr<Source> source,
                                            FilesystemOptions options, Status& status);
  ~Filesystem();  // stop()
  Filesystem(const Filesystem&) = delete;
  Filesystem& operator=(const Filesystem&) = delete;

  // Mounts at `mountpoint` (an existing directory); starts prefetch, fill,
  // trace recording and the status socket. The mount serves once serve() or
  // start() runs.
  Status mount(const std::filesystem::path& mountpoint);
  // Serves on this thread until the file system is unmounted or stop() is
  // called; then unmounts. Returns the number of a signal that ended it (see
  // handle_signals), or 0.
  int serve();
  // Serves on a background thread.
  Status start();
  // Ends serving and unmounts; waits for a background serve to end. Requests
  // still waiting for bytes are answered (EIO), the cache maps flushed.
  void stop();
  // Routes SIGINT, SIGTERM and SIGHUP to this file system (process-wide: for
  // a program that runs one file system, like the lazyfs command).
  Status handle_signals();

  // The document `lazyfs status --json` prints.
  std::string status_json() const;
  FetchEngine& engine();
  const std::filesystem::path& mountpoint() const;

  struct Impl;

 private:
  explicit Filesystem(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The document `lazyfs status --json` prints, asked of the mount served at
// `mountpoint` (by this process or another) over its status socket; without
// the per-file list unless `with_files`. For a program that watches a mount
// (a poll costs a connect and the document, no process).
Status query_status(const std::filesystem::path& mountpoint, std::string& json,
                    bool with_files = true);

}  // namespace lazyfs
