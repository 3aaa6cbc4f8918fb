// The ways of getting a checkpoint's files to the restore host that the
// benchmark compares, and one cold run of each:
//
//   eager-scp    scp -r (the legacy SCP protocol, -O) of every file, then run
//   eager-sftp   OpenSSH's sftp client in batch mode (get -r), then run
//   eager-rsync  rsync -a over ssh, then run
//   sshfs        mount the source tree with sshfs, run through it
//   lazyfs       lazyfs mount + lazyfs prepare, run through the mount
//   lazyfs+fill  the same with --fill; also times until every byte is local
//   lazyfs+fill-auto  the same with --fill-alongside auto
//   lazyfs+fill-first  lazyfs with --fill, run once every byte is local (the
//                fill as an eager copy)
//   lazyfs+prefetch  an untimed run with --record-trace first, then the
//                same with --prefetch of that trace
//
// "Run" is the workload reading the scenario's plan, or with --criu a real
// `criu restore` of a dumped workload. Every run starts cold: page cache
// dropped, fresh destination, cache and mount directories, fresh mounts.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "scenarios.h"

namespace lazyfs::bench {

class SshServer;
class DelayRelay;

const std::vector<std::string>& method_names();

// Where a run's restore side lives (its checkpoint copy, mountpoint, lazyfs
// cache and eager copy): a file system of its own, made by mkfs.ext4 with
// its defaults for each run (fresh_ext4), or the scratch directory's.
struct RestoreFs {
  bool fresh_ext4 = true;
  uint64_t bytes = 0;   // the sparse image's size
  uint64_t inodes = 0;  // mkfs.ext4 -N
};

struct BenchContext {
  std::filesystem::path scratch;      // per-run directories go under scratch/run
  std::filesystem::path source_root;  // the source tree: file P is at source_root + P
  std::filesystem::path bin_dir;      // lazyfs and lazyfs-bench-workload
  const SshServer* ssh = nullptr;
  DelayRelay* relay = nullptr;
  bool verbose = false;
  std::vector<std::string> lazyfs_options;  // --lazyfs-option: added to every lazyfs mount
  RestoreFs restore_fs;
};

// One scenario ready to run: its checkpoint and plan, or its CRIU dump.
struct PreparedScenario {
  const Scenario* scenario = nullptr;
  std::filesystem::path checkpoint;  // write_checkpoint's, or criu dump's
  std::filesystem::path plan_file;
  // CRIU mode only (criu set): the dumped process had its files at
  // files_root + P, which must be made reachable again before restore;
  // lazyfs reads file Q (= files_root + P) at lazyfs_remote_root + Q.
  std::optional<std::filesystem::path> criu;
  std::filesystem::path files_root;
  std::filesystem::path lazyfs_remote_root;
  std::filesystem::path criu_dir;  // go-file, result file, logs
};

struct Sample {
  double ready_s = 0;       // method start until the reads are done
  double first_byte_s = 0;  // method start until the first byte read
  double setup_s = 0;       // method start until the reads could start (copy done, mounted)
  uint64_t to_server = 0;   // bytes through the relay, each direction
  uint64_t to_client = 0;
  uint64_t bytes_read = 0;  // by the workload
  std::optional<double> lazyfs_cpu_s;
  std::optional<uint64_t> lazyfs_peak_rss_kib;
  std::optional<uint64_t> lazyfs_fetched_bytes;  // payload, from `lazyfs status`
  // lazyfs methods: demand reads that waited for a fetch, after the workload.
  std::optional<uint64_t> demand_misses;
  // lazyfs+fill: method start until `lazyfs status` said every file is local.
  std::optional<double> wholly_local_s;
};

// One cold run. Throws with what failed (and Interrupted).
Sample run_method(const std::string& method, const PreparedScenario& scenario,
                  const BenchContext& ctx);

// Empties the page cache (best effort: a container may refuse).
void drop_caches();
// Detaches every mount at or below `dir`, then removes it. Never descends
// into a mount.
void remove_tree(const std::filesystem::path& dir);

}  // namespace lazyfs::bench
