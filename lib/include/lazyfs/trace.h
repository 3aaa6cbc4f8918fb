// Access traces: which blocks of which files a restored process read in its
// first seconds, in order, so the next migration of the same application can
// fetch them before they are asked for (`lazyfs mount --record-trace` and
// `--prefetch`).
//
// Format (text, one record per line):
//
//     lazyfs-trace 1
//     # anything after '#' is a comment
//     OFFSET LENGTH PATH
//
// OFFSET and LENGTH are decimal bytes; PATH is the file's path in the
// checkpoint (the rest of the line, so it may hold spaces). Records are in
// the order the blocks were first read.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lazyfs {

struct TraceRecord {
  std::string path;
  uint64_t offset = 0;
  uint64_t length = 0;
};

class TraceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Reads a trace; throws TraceError ("FILE:LINE: what is wrong") if the file
// cannot be read or a line is malformed.
std::vector<TraceRecord> read_trace(const std::filesystem::path& file);

// Records demand reads for `window` after construction, one record per block
// (first read only), and writes them when finish() is called (or the window
// has passed and another read comes). Thread-safe.
class TraceRecorder {
 public:
  TraceRecorder(std::filesystem::path file, std::chrono::seconds window, uint64_t block_size);

  void record(const std::string& path, uint64_t offset, uint64_t length);
  // Writes the trace (atomically); later calls do nothing. Returns false with
  // `error` set if it could not be written.
  bool finish(std::string& error);
  size_t records() const;

 private:
  std::filesystem::path file_;
  std::chrono::steady_clock::time_point deadline_;
  uint64_t block_size_;
  mutable std::mutex mutex_;
  bool finished_ = false;                            // guarded by mutex_
  std::set<std::pair<std::string, uint64_t>> seen_;  // guarded: (path, block)
  std::vector<TraceRecord> records_;                 // guarded by mutex_
};

}  // namespace lazyfs
