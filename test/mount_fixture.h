// Helpers for tests that mount lazyfs for real: a source tree holding the
// fixture checkpoint's files at their recorded paths, sizes and modes, and a
// `lazyfs mount` daemon started and stopped by the test.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lazyfs/catalog.h"

namespace lazyfs::test {

// The byte at `offset` of the source's copy of `path`.
uint8_t source_byte(const std::string& path, uint64_t offset);
std::vector<uint8_t> source_bytes(const std::string& path, uint64_t offset, size_t length);

// Writes every served file of `catalog` under `root` (ROOT + path) with its
// recorded size (kAppendSize bytes when none is recorded) and mode. Files with
// a build-id start with an ELF magic.
inline constexpr uint64_t kAppendSize = 5000;
void populate_source(const Catalog& catalog, const std::filesystem::path& root);
// The whole content populate_source() gives `f`, which a mount must serve.
std::vector<uint8_t> file_bytes(const CatalogFile& f);

// A running `lazyfs mount`, stopped (SIGTERM, then waited for) on destruction.
class LazyfsMount {
 public:
  // Runs `lazyfs mount [extra...] MOUNTPOINT IMGDIR SOURCE` detached, through
  // `launcher` if given (a program and its arguments, lazyfs's path then
  // following); the mount serves when this returns. Throws with the
  // command's stderr if not.
  LazyfsMount(const std::filesystem::path& mountpoint, const std::filesystem::path& image_dir,
              const std::string& source, const std::vector<std::string>& extra,
              const std::vector<std::string>& launcher = {});
  ~LazyfsMount();
  LazyfsMount(const LazyfsMount&) = delete;
  LazyfsMount& operator=(const LazyfsMount&) = delete;

  std::filesystem::path at(const std::string& path) const { return mountpoint_.string() + path; }
  const std::filesystem::path& mountpoint() const { return mountpoint_; }
  nlohmann::json status() const;
  pid_t pid() const { return pid_; }
  // SIGTERM and wait; true if the daemon exited and the mount is gone.
  bool stop();

 private:
  std::filesystem::path mountpoint_;
  pid_t pid_ = -1;
};

// Whether something is mounted at `path` (per /proc/self/mounts).
bool is_mounted(const std::filesystem::path& path);

// Reads a whole file; throws on error.
std::vector<uint8_t> read_file(const std::filesystem::path& file);

}  // namespace lazyfs::test
