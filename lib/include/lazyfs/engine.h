// FetchEngine: turns reads of missing bytes into range requests to a source,
// on a Boost.Asio worker pool, and calls each requester back once its bytes
// are in the local cache. Callers' threads only queue work; a miss never
// blocks them.
//
// - Requests are widened to whole blocks (EngineOptions::block_size).
// - Adjacent missing blocks are coalesced into one source request of at most
//   EngineOptions::max_request bytes; a block is fetched at most once at a
//   time however many requesters want it.
// - A requester is woken as soon as its own blocks are present, not when the
//   whole source request ends (sources stream chunks as they arrive).
// - Priorities: demand before prefetch before read-ahead before background; a
//   queued request whose blocks a higher-priority request wants is raised.
// - Sequential reads grow a read-ahead window from one block up to
//   EngineOptions::readahead_max; a random read shrinks it back.
// - Before a file is first served it is stat'ed on the source once: a type or
//   size that differs from the checkpoint's marks it stale, and its reads fail
//   with EIO (logged once) rather than serve bytes of another version.
// - A transient source failure is retried with exponential back-off until the
//   request's retry budget is spent; then every requester of the failed blocks
//   gets EIO, with a log line saying why, and a later request tries again.
// - The cache's range maps are flushed on a timer and at shutdown.
//
// Lock order: File::mutex, then the retry timers' mutex, then queue_mutex_, then (leaf) a
// CacheFile's lock.
// No lock is held across source I/O or while a completion runs.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lazyfs/cache.h"
#include "lazyfs/source.h"
#include "lazyfs/status.h"

namespace lazyfs {

// Demand: a reader waits. Prefetch: blocks a recorded trace says will be
// read soon. Read-ahead: past a sequential reader. Background: fill.
enum class Priority : int { kDemand = 0, kPrefetch = 1, kReadAhead = 2, kBackground = 3 };
inline constexpr size_t kPriorityCount = 4;

struct EngineOptions {
  // Unit of fetching and of the cache's bookkeeping. 128 KiB: see
  // docs/architecture.md for the measurement behind it.
  uint64_t block_size = 128 << 10;
  // Largest single source request that adjacent missing blocks are
  // coalesced into.
  uint64_t max_request = 4 << 20;
  uint64_t readahead_max = 8 << 20;
  // Worker threads; 0 means the source's max_concurrency().
  unsigned threads = 0;
  // Total time a request may spend retrying before its requesters get EIO.
  std::chrono::milliseconds retry_budget{30000};
  std::chrono::milliseconds retry_initial{100};
  std::chrono::milliseconds retry_max{5000};
  std::chrono::milliseconds flush_interval{1000};
};

// What a file looks like once validated against the source.
struct FileInfo {
  uint64_t size = 0;  // the checkpoint's, or the source's when none was recorded
  SourceStat source;  // the source's stat
};

// Totals, for `lazyfs status` and the benchmarks.
struct EngineStats {
  uint64_t fetched_bytes = 0;    // payload received from the source
  uint64_t fetch_requests = 0;   // source read requests completed
  uint64_t requests = 0;         // request() calls
  uint64_t cache_hits = 0;       // request() calls with every byte present
  uint64_t demand_misses = 0;    // demand request() calls that had to wait for a fetch
  uint64_t demand_requests = 0;  // demand request() calls (readers' reads), hits included
  uint64_t inflight = 0;         // source requests queued or running
  uint64_t retries = 0;
  uint64_t errors = 0;         // source requests given up on
  uint64_t latency_count = 0;  // completed source requests, and their
  double latency_sum_s = 0;    //   total and worst latency
  double latency_max_s = 0;
  double latency_min_s = 0;                    // the fastest (0 until one completed)
  std::array<uint64_t, 16> latency_ms_log2{};  // bucket i: [2^(i-1), 2^i) ms
};

struct FileStats {
  std::string path;
  std::optional<uint64_t> size;  // known once validated or recorded
  uint64_t fetched_bytes = 0;    // bytes fetched by this engine
  uint64_t present_bytes = 0;    // bytes in the cache (fetched now or before)
  uint64_t local_bytes = 0;      // bytes written locally
  bool stale = false;
  bool durable = true;  // the cache's map on disk records every present byte
};

class FetchEngine {
 public:
  using FileId = uint32_t;
  using Completion = std::function<void(const Status&)>;
  using InfoCompletion = std::function<void(const Status&, const FileInfo&)>;

  FetchEngine(std::shared_ptr<Source> source, BlockCache& cache, EngineOptions options);
  // stop().
  ~FetchEngine();

  // Fails what is queued (ECANCELED), cancels the source (Source::cancel():
  // what is running fails at once instead of waiting out a hung source),
  // waits for the completions, and flushes the cache; later requests fail at
  // once.
  // Once it returns no completion runs any more. Idempotent; the destructor
  // calls it.
  void stop();
  FetchEngine(const FetchEngine&) = delete;
  FetchEngine& operator=(const FetchEngine&) = delete;

  // Registers a served file before use (not thread-safe against request()).
  FileId add_file(const std::string& path, std::optional<uint64_t> recorded_size,
                  std::optional<uint32_t> recorded_mode);

  // Validates every file not yet validated, with pipelined batches of stats
  // on the source, so that later lookups find their answers ready. `first`
  // (a trace's files) go ahead of the rest, and the rest then at prefetch
  // priority: behind readers' fetches, ahead of a prefetch queued later; a
  // reader waiting for one of them moves its batch ahead.
  void validate_all(const std::vector<FileId>& first = {});

  // Validates the file against the source (once; later calls answer from
  // memory). `done` runs on a worker thread, or on this one if already known.
  // A reader that has to wait (`priority` kDemand) makes background work
  // give way, as a demand miss does.
  void file_info(FileId file, InfoCompletion done, Priority priority = Priority::kDemand);

  // Calls `done` once every byte of [offset, offset + length) (clipped to the
  // file's size) is in the cache, or with the error that stopped it. Runs on
  // this thread when nothing is missing, otherwise on a worker thread.
  // `done` may be empty (read-ahead, prefetch).
  void request(FileId file, uint64_t offset, uint64_t length, Priority priority, Completion done);

  // request() of many ranges at one priority, queued together so that they
  // go to the source as few pipelined batches (a fill's or a prefetch's
  // small files). Each `done` (may be empty) as for request().
  struct RangeRequest {
    FileId file = 0;
    uint64_t offset = 0;
    uint64_t length = 0;
    Completion done;
  };
  void request_many(std::vector<RangeRequest> requests, Priority priority);

  // The file's cache (null until validated). Reads of present bytes go
  // straight to its fd; local writes go through it.
  CacheFile* cache_file(FileId file);

  // The file's current size if known: the cache's once validated, else the
  // recorded one.
  std::optional<uint64_t> known_size(FileId file) const;

  size_t file_count() const { return files_.size(); }
  // Source requests that may run at once.
  unsigned workers() const { return workers_; }

  EngineStats stats() const;
  // When a demand request last had to start a fetch (or raise a queued one)
  // to get its bytes (the epoch if never): background work backs off while
  // readers are missing. Waiting for bytes already being fetched does not
  // count here (it does in EngineStats::demand_misses).
  std::chrono::steady_clock::time_point last_demand_miss() const;
  // The file of that miss.
  FileId last_missed_file() const;
  // Whether a reader is waiting right now (for a fetch or a validation).
  bool readers_waiting() const;
  // When a reader last began or ended such a wait (also for a fetch that
  // another started).
  std::chrono::steady_clock::time_point last_reader_wait() const;
  // Demand request() calls so far (EngineStats::demand_requests), cheaply:
  // how fast readers are served.
  uint64_t demand_requests() const;
  // Whether a file is being validated (as at mount, validate_all()).
  bool validating() const;
  // Whether a reader is waiting right now for its file's validation.
  bool readers_await_validation() const;
  // The fastest source request so far (max() before the first): none takes
  // less than the source's round trip, so this bounds it from above.
  std::chrono::nanoseconds fastest_fetch() const;
  // Without paths (`path` left empty) they cost no allocation per file:
  // totals, as `lazyfs status --no-files` gives, with many files.
  std::vector<FileStats> file_stats(bool with_paths = true) const;
  FileStats file_stat(FileId file, bool with_path = true) const;
  // Makes every byte in the cache durable and recorded in its map now, on
  // this thread, instead of at the next flush on the timer.
  Status flush_cache();
  SourceState source_state() const;
  const EngineOptions& options() const { return options_; }
  Source& source() { return *source_; }

 private:
  struct File;
  struct Job;
  struct Waiter;
  class Pool;

  void start_validation(File& f);
  std::shared_ptr<Job> hasten_validation_locked(File& f, Priority priority);
  using Jobs = std::vector<std::shared_ptr<Job>>;
  // What validations leave to do once no lock is held: fetches to queue, then
  // callbacks of those who waited.
  struct Validated {
    Jobs jobs;
    std::vector<std::function<void()>> then;
  };
  void on_validated(File& f, const Status& status, const SourceStat& st, Validated& out);
  bool validate_locally(File& f, Validated& out);
  void note_reader_waiting(const File& f);
  template <typename Done>
  Done parked(Priority priority, Done done);
  template <typename Done>
  Done parked_for_validation(Priority priority, Done done);
  void release(Validated& v);
  void request_into(FileId file, uint64_t offset, uint64_t length, Priority priority,
                    Completion done, std::vector<std::shared_ptr<Job>>& jobs);
  void request_validated(File& f, uint64_t offset, uint64_t length, Priority priority,
                         Completion done, std::vector<std::shared_ptr<Job>>& jobs);
  void enqueue(std::shared_ptr<Job> job);
  void enqueue_all(std::vector<std::shared_ptr<Job>> jobs);
  void run_next();
  struct Landing;
  void run_fetches(const std::vector<std::shared_ptr<Job>>& batch);
  void store_chunk(Landing& l, uint64_t at, std::span<const std::byte> data);
  void end_fetch(Landing& l, Status status);
  void run_stat(const std::shared_ptr<Job>& job);
  void run_stat_many(const std::shared_ptr<Job>& job);
  void abandon(const std::shared_ptr<Job>& job, const Status& status);
  bool retry_later(const std::shared_ptr<Job>& job, const Status& status);
  void fail_blocks(File& f, Range range, const Status& status);
  void readahead_locked(File& f, uint64_t offset, uint64_t end,
                        std::vector<std::shared_ptr<Job>>& jobs);
  void plan_fetches_locked(File& f, Range range, Priority priority,
                           std::vector<std::shared_ptr<Job>>& jobs);
  void schedule_flush();
  void record_latency(std::chrono::steady_clock::duration d);

  std::shared_ptr<Source> source_;
  BlockCache& cache_;
  EngineOptions options_;
  std::vector<std::unique_ptr<File>> files_;

  std::mutex stop_mutex_;  // one stop() at a time; taken before queue_mutex_
  mutable std::mutex queue_mutex_;
  std::array<std::deque<std::shared_ptr<Job>>, kPriorityCount> queues_;  // guarded
  bool stopping_ = false;                                                // guarded
  unsigned running_ = 0;             // guarded: jobs running now, at most workers_
  unsigned running_background_ = 0;  // guarded: of those, background ones
  unsigned workers_ = 1;

  struct Counters;
  std::unique_ptr<Counters> counters_;
  std::unique_ptr<Pool> pool_;  // last: destroyed (joined) first
};

}  // namespace lazyfs
