// Sources: where the bytes of a checkpoint's files come from. The file with
// image path P is read at ROOT + P on the source (ROOT is the source's remote
// root, "/" by default).
//
// Calls block and are made from the engine's worker threads, never from a
// FUSE thread. A source serves up to max_concurrency() calls at once (one per
// pooled connection) and queues the rest. Every call returns within a bounded
// time: a stalled transfer fails with a transient Status, never hangs.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lazyfs/status.h"

namespace lazyfs {

struct SourceStat {
  uint32_t mode = 0;  // whole st_mode
  uint64_t size = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  int64_t atime = 0;  // seconds since the epoch
  int64_t mtime = 0;
};

// Receives a read's bytes in ascending, contiguous chunks as they arrive, so
// the engine can store them and wake waiters before the whole range is in.
using ChunkSink = std::function<void(uint64_t offset, std::span<const std::byte> data)>;

// What a source has done, for `lazyfs status` and the benchmarks.
struct SourceCounters {
  std::atomic<uint64_t> connects{0};  // connections (SSH sessions) opened
  std::atomic<uint64_t> connect_failures{0};
  std::atomic<uint64_t> reads{0};       // read requests served
  std::atomic<uint64_t> bytes_read{0};  // payload bytes received
  std::atomic<uint64_t> stats{0};
  // Writes of requests to the connections (SFTP): one can carry many.
  std::atomic<uint64_t> request_writes{0};
  // OPENs that got the handle lazyfs predicted, its READs already sent
  // (SFTP; see docs/architecture.md "Sources").
  std::atomic<uint64_t> predicted_opens{0};
};

enum class SourceState { kConnected, kRetrying, kDown };
const char* source_state_name(SourceState state);

// ECANCELED, permanent: what a call ended by shutdown (Source::cancel(),
// FetchEngine::stop()) fails with.
Status shutting_down();

class Source {
 public:
  virtual ~Source() = default;

  // "sftp://user@host:port/root" or "file:///dir": for logs, never secrets.
  virtual std::string describe() const = 0;

  // stat(2) of ROOT + path, following symlinks.
  virtual Status stat(const std::string& path, SourceStat& out) = 0;

  // stat() of many paths; `done(i, status, stat)` runs once for each, in any
  // order, on the calling thread. Sources with round trips pipeline them.
  using StatDone = std::function<void(size_t index, const Status&, const SourceStat&)>;
  virtual void stat_many(const std::vector<std::string>& paths, const StatDone& done) {
    for (size_t i = 0; i < paths.size(); ++i) {
      SourceStat st;
      Status status = stat(paths[i], st);
      done(i, status, st);
    }
  }

  // Reads [offset, offset + length) of ROOT + path and hands it to `sink`.
  // Fewer bytes only when the file ends first (then ok, with what there was).
  // A failure may come after some chunks were delivered; they are valid.
  virtual Status read(const std::string& path, uint64_t offset, uint64_t length,
                      const ChunkSink& sink) = 0;

  // One range of a read_many() call.
  struct ReadRange {
    std::string path;
    uint64_t offset = 0;
    uint64_t length = 0;
    ChunkSink sink;
    // The stat the file was validated with. A source that can check it
    // cheaply (SFTP: an FSTAT pipelined ahead of the READs; file://) fails
    // the range with ESTALE, before delivering a byte, if the file's size,
    // type or mtime (seconds) is no longer that.
    std::optional<SourceStat> expect;
  };
  using ReadDone = std::function<void(size_t index, const Status&)>;

  // read() of several ranges (of one file or of many) in one call: `done(i,
  // status)` runs once for each, in any order, on the calling thread, as soon
  // as range i has been delivered or has failed. Sources with round trips
  // pipeline them: over SFTP the OPEN, READs and CLOSE of many files are in
  // flight at once on one connection, so a batch of small files costs about
  // one round trip instead of two per file.
  virtual void read_many(std::span<const ReadRange> ranges, const ReadDone& done) {
    for (size_t i = 0; i < ranges.size(); ++i) {
      const auto& r = ranges[i];
      done(i, read(r.path, r.offset, r.length, r.sink));
    }
  }

  // How many calls the source serves at once.
  virtual unsigned max_concurrency() const = 0;

  // Starts opening connections ahead of need (in the background); a source
  // without connections does nothing.
  virtual void warm_up_async() {}

  virtual SourceState state() const { return SourceState::kConnected; }
  const SourceCounters& counters() const { return counters_; }

  // Ends every call in flight at once, and fails every later one, with
  // shutting_down(): for a shutdown that must not wait out a hung source's
  // time-outs. Thread-safe, irreversible. A source whose calls cannot hang
  // (file://) does nothing.
  virtual void cancel() {}

 protected:
  SourceCounters counters_;
};

// Why a file stat'ed as `now` is not the one validated as `then` (its size,
// type or mtime changed), or empty if it is.
std::string changed_since(const SourceStat& then, const SourceStat& now);

// Reads into `buf` (convenience over Source::read); `got` is the bytes read.
Status read_into(Source& source, const std::string& path, uint64_t offset, std::span<std::byte> buf,
                 size_t& got);

// A local directory: file:///DIR. For tests, for embedding and for
// checkpoints kept on shared storage.
std::unique_ptr<Source> make_local_source(const std::string& root, Status& status);

// A source that could not be reached and is not needed: every call fails
// with `reason`, permanently. A mount whose files are all wholly in the cache
// serves them over it (their maps stand in for the source's stat).
std::unique_ptr<Source> make_unreachable_source(std::string description, Status reason);

}  // namespace lazyfs
