#include "lazyfs/engine.h"

#include <sys/stat.h>

#include <fmt/core.h>
#include <algorithm>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <cerrno>
#include <cmath>
#include <limits>
#include <set>

#include "lazyfs/log.h"

namespace lazyfs {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

struct FetchEngine::Waiter {
  Range range;  // block-aligned, clipped to the file's size
  Completion done;
};

struct FetchEngine::File {
  enum class State { kUnknown, kValidating, kReady, kStale };

  FileId id = 0;
  std::string path;
  std::optional<uint64_t> recorded_size;
  std::optional<uint32_t> recorded_mode;
  std::atomic<uint64_t> fetched_bytes{0};

  std::mutex mutex;
  // Everything below is guarded by mutex.
  State state = State::kUnknown;
  Status stale_status;
  Status validate_error;  // why the last validation could not ask the source
  FileInfo info;
  CacheFile* cache = nullptr;
  RangeSet inflight;                       // blocks queued or being fetched
  std::vector<std::shared_ptr<Job>> jobs;  // the fetch jobs covering `inflight`
  std::vector<Waiter> waiters;
  // Requests waiting for validation; they add their fetch jobs to the vector.
  std::vector<std::function<void(Jobs&)>> pending;
  std::vector<InfoCompletion> info_waiters;
  // The batch validating this file while kValidating from validate_all(),
  // so that a reader waiting for it can move the batch ahead.
  std::shared_ptr<Job> validation;
  // Read-ahead: the last block of the current sequential run (if any), the
  // run's length in blocks, the window, and how far read-ahead was asked for.
  bool read_before = false;
  uint64_t last_end = 0;
  uint64_t run_blocks = 0;
  uint64_t ra_window = 0;
  uint64_t ra_frontier = 0;  // bytes
};

struct FetchEngine::Job {
  enum class Kind { kFetch, kStat, kStatMany };
  Kind kind;
  File* file;                // kFetch, kStat
  std::vector<File*> batch;  // kStatMany
  Range range;               // what is still to fetch (shrinks on retry)
  std::atomic<int> priority;
  std::atomic<bool> started{false};
  Clock::time_point deadline;  // end of the retry budget
  std::chrono::milliseconds backoff{0};
  Clock::time_point queued_at = Clock::now();

  Job(Kind k, File* f, Range r, Priority p)
      : kind(k), file(f), range(r), priority(static_cast<int>(p)) {}
};

struct FetchEngine::Counters {
  std::atomic<uint64_t> fetched_bytes{0};
  std::atomic<uint64_t> fetch_requests{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> cache_hits{0};
  std::atomic<uint64_t> demand_misses{0};
  std::atomic<uint64_t> demand_requests{0};
  std::atomic<int64_t> last_demand_miss_ns{0};  // steady_clock, since its epoch
  std::atomic<uint32_t> last_missed_file{0};
  std::atomic<int64_t> readers_waiting{0};     // parked demand completions
  std::atomic<int64_t> last_wait_ns{0};        // one parked or woke, steady_clock
  std::atomic<int64_t> validating{0};          // files being validated
  std::atomic<int64_t> readers_validating{0};  // parked demand completions awaiting one
  std::atomic<uint64_t> inflight{0};
  std::atomic<uint64_t> retries{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint64_t> retrying{0};  // jobs waiting out a back-off
  std::mutex latency_mutex;
  uint64_t latency_count = 0;  // guarded by latency_mutex
  double latency_sum_s = 0;
  double latency_max_s = 0;
  std::array<uint64_t, 16> latency_ms_log2{};
  std::atomic<int64_t> latency_min_ns{std::numeric_limits<int64_t>::max()};
};

// The worker threads, the timers that run on them, and the retry timers in
// flight (cancelled at shutdown so that joining does not wait for them).
class FetchEngine::Pool {
 public:
  explicit Pool(unsigned threads) : pool(threads), flush_timer(pool) {}
  asio::thread_pool pool;
  asio::steady_timer flush_timer;
  std::mutex timers_mutex;
  std::set<std::shared_ptr<asio::steady_timer>> retry_timers;  // guarded by timers_mutex
};

namespace {

uint64_t align_down(uint64_t v, uint64_t block) {
  return v / block * block;
}
uint64_t align_up(uint64_t v, uint64_t block) {
  uint64_t r = v % block;
  return r == 0 ? v : v + (block - r);
}
bool overlaps(Range a, Range b) {
  return a.begin < b.end && b.begin < a.end;
}

}  // namespace

FetchEngine::FetchEngine(std::shared_ptr<Source> source, BlockCache& cache, EngineOptions options)
    : source_(std::move(source)),
      cache_(cache),
      options_(options),
      counters_(std::make_unique<Counters>()) {
  if (options_.block_size == 0 || options_.max_request < options_.block_size) {
    throw std::invalid_argument("block size must be positive and at most the largest request");
  }
  options_.max_request = align_down(options_.max_request, options_.block_size);
  workers_ = std::max(1u, options_.threads ? options_.threads : source_->max_concurrency());
  // One more thread than source requests at once, so that a cache flush or a
  // retry timer never waits for a slow transfer to free a thread.
  pool_ = std::make_unique<Pool>(workers_ + 1);
  source_->warm_up_async();
  schedule_flush();
}

FetchEngine::~FetchEngine() {
  stop();
}

void FetchEngine::stop() {
  std::lock_guard stop_lock(stop_mutex_);
  std::vector<std::shared_ptr<Job>> abandoned;
  {
    std::lock_guard lock(queue_mutex_);
    if (stopping_) return;
    stopping_ = true;
    for (auto& q : queues_) {
      for (auto& j : q) {
        if (!j->started.exchange(true)) abandoned.push_back(j);
      }
      q.clear();
    }
  }
  const auto cancelled = shutting_down();
  for (auto& j : abandoned) abandon(j, cancelled);
  // What is running ends now, not when a hung source's time-outs end it.
  source_->cancel();
  {
    // Under the lock that schedule_flush() arms it under: a timer is not
    // safe to cancel while another thread sets it.
    std::lock_guard lock(queue_mutex_);
    pool_->flush_timer.cancel();
  }
  {
    std::lock_guard lock(pool_->timers_mutex);
    for (auto& t : pool_->retry_timers) t->cancel();
  }
  pool_->pool.join();
  if (auto st = cache_.flush_all(); !st.ok()) {
    log::error("engine", "cache flush at shutdown failed: {}", st.message());
  }
}

FetchEngine::FileId FetchEngine::add_file(const std::string& path,
                                          std::optional<uint64_t> recorded_size,
                                          std::optional<uint32_t> recorded_mode) {
  auto f = std::make_unique<File>();
  f->id = static_cast<FileId>(files_.size());
  f->path = path;
  f->recorded_size = recorded_size;
  f->recorded_mode = recorded_mode;
  files_.push_back(std::move(f));
  return static_cast<FileId>(files_.size() - 1);
}

CacheFile* FetchEngine::cache_file(FileId id) {
  File& f = *files_.at(id);
  std::lock_guard lock(f.mutex);
  return f.cache;
}

void FetchEngine::file_info(FileId id, InfoCompletion done, Priority priority) {
  File& f = *files_.at(id);
  std::unique_lock lock(f.mutex);
  switch (f.state) {
    case File::State::kReady: {
      auto info = f.info;
      lock.unlock();
      done({}, info);
      return;
    }
    case File::State::kStale: {
      auto st = f.stale_status;
      lock.unlock();
      done(st, {});
      return;
    }
    case File::State::kUnknown:
      f.info_waiters.push_back(parked_for_validation(priority, std::move(done)));
      start_validation(f);  // sets kValidating
      return;
    case File::State::kValidating: {
      f.info_waiters.push_back(parked_for_validation(priority, std::move(done)));
      auto raised = hasten_validation_locked(f, priority);
      lock.unlock();
      if (raised) enqueue(std::move(raised));
      return;
    }
  }
}

// `first` go in a batch of their own, queued first; the rest in batches of
// a few hundred, so that the workers validate in parallel and a worker is
// soon free for more urgent work.
void FetchEngine::validate_all(const std::vector<FileId>& first) {
  Jobs jobs;
  const auto take = [&](File& f, std::vector<File*>& into) {
    std::lock_guard lock(f.mutex);
    if (f.state != File::State::kUnknown) return;
    f.state = File::State::kValidating;
    ++counters_->validating;
    into.push_back(&f);
  };
  std::vector<File*> todo;
  for (FileId id : first) {
    if (id < files_.size()) take(*files_[id], todo);
  }
  const auto queue = [&](std::vector<File*> batch, Priority priority) {
    auto job = std::make_shared<Job>(Job::Kind::kStatMany, nullptr, Range{}, priority);
    for (File* f : batch) {
      std::lock_guard lock(f->mutex);
      if (f->state == File::State::kValidating) f->validation = job;
    }
    job->batch = std::move(batch);
    jobs.push_back(std::move(job));
  };
  if (!todo.empty()) queue(std::exchange(todo, {}), Priority::kDemand);
  for (auto& f : files_) take(*f, todo);
  // A directory's files together: a source may list the directory rather
  // than ask for each of them (SFTP does).
  const auto dir_of = [](const File* f) {
    const std::string_view p = f->path;
    return p.substr(0, p.rfind('/') + 1);
  };
  std::stable_sort(todo.begin(), todo.end(),
                   [&](const File* a, const File* b) { return dir_of(a) < dir_of(b); });
  // The rest at prefetch priority: behind readers' fetches, ahead of the
  // prefetch (queued later), so a lookup of a file the trace does not name
  // never waits for the whole prefetch; a reader that waits for one of these
  // files moves its batch ahead of the others (hasten_validation_locked).
  // Before v9, without a trace, at readers' priority: then a restore's first
  // fetch waited behind every batch (0.5 s for 20,000 files on loopback).
  const Priority rest = Priority::kPrefetch;
  constexpr size_t kBatch = 256;
  const size_t batches = (todo.size() + kBatch - 1) / kBatch;
  for (size_t b = 0; b < batches; ++b) {
    const size_t from = todo.size() * b / batches;
    const size_t to = todo.size() * (b + 1) / batches;
    queue({todo.begin() + static_cast<ptrdiff_t>(from), todo.begin() + static_cast<ptrdiff_t>(to)},
          rest);
  }
  enqueue_all(std::move(jobs));
}

// Caller holds f.mutex. Raises the queued batch validating `f` to
// `priority`; returns it to be queued again there (the old entry is then
// skipped), or null if there is none, it started, or it is that urgent already.
std::shared_ptr<FetchEngine::Job> FetchEngine::hasten_validation_locked(File& f,
                                                                        Priority priority) {
  const auto& job = f.validation;
  const int p = static_cast<int>(priority);
  if (!job || job->started.load() || job->priority.load() <= p) return nullptr;
  job->priority = p;
  return job;
}

// A file the cache holds whole, as its map on disk says, is validated by
// the map: it no longer needs the source, which may be gone (released once
// the fill completed).
bool FetchEngine::validate_locally(File& f, Validated& out) {
  CacheFile* cache = cache_.wholly_present_file(f.path, f.recorded_size);
  if (!cache) return false;
  on_validated(f, {}, *cache->source_stat(), out);
  return true;
}

void FetchEngine::run_stat_many(const std::shared_ptr<Job>& job) {
  const auto t0 = Clock::now();
  // Requests that waited for these files are queued a few dozen at a time,
  // so that they go to the source in batches too.
  Validated ready;
  std::vector<File*> remote;
  std::vector<std::string> paths;
  for (File* f : job->batch) {
    if (validate_locally(*f, ready)) continue;
    remote.push_back(f);
    paths.push_back(f->path);
  }
  release(ready);
  if (!paths.empty()) {
    source_->stat_many(paths, [&](size_t i, const Status& status, const SourceStat& st) {
      on_validated(*remote[i], status, st, ready);
      if (ready.jobs.size() + ready.then.size() >= 32) release(ready);
    });
  }
  release(ready);
  log::debug("engine", "validated files={} local={} ms={:.1f}", job->batch.size(),
             job->batch.size() - paths.size(),
             std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
}

void FetchEngine::start_validation(File& f) {
  f.state = File::State::kValidating;
  ++counters_->validating;
  auto job = std::make_shared<Job>(Job::Kind::kStat, &f, Range{}, Priority::kDemand);
  job->deadline = Clock::now() + options_.retry_budget;
  job->backoff = options_.retry_initial;
  enqueue(std::move(job));
}

void FetchEngine::on_validated(File& f, const Status& status, const SourceStat& st,
                               Validated& out) {
  std::vector<std::function<void(Jobs&)>> pending;
  std::vector<InfoCompletion> info_waiters;
  Status result = status;
  FileInfo info;
  {
    std::lock_guard lock(f.mutex);
    pending.swap(f.pending);
    info_waiters.swap(f.info_waiters);
    f.validation.reset();
    if (f.state == File::State::kValidating) --counters_->validating;
    if (status.errnum() == ECANCELED) {
      // The engine is stopping: not an answer about the file.
      f.state = File::State::kUnknown;
      f.validate_error = status;
    } else if (!status.ok() && status.retryable()) {
      // Not stale: the source could not be asked. A later request asks again.
      f.state = File::State::kUnknown;
      result = Status::transient(EIO, fmt::format("cannot stat {} on {}: {}", f.path,
                                                  source_->describe(), status.message()));
      f.validate_error = result;
    } else if (!status.ok()) {
      // The source answered, and the answer is no (no such file, no access).
      f.state = File::State::kStale;
      f.stale_status = Status::permanent(EIO, fmt::format("{} cannot be served from {}: {}", f.path,
                                                          source_->describe(), status.message()));
      log::error("engine", "unservable path={} reason=\"{}\"", f.path, status.message());
      result = f.stale_status;
    } else {
      std::string why;
      if (f.recorded_mode && (st.mode & S_IFMT) != (*f.recorded_mode & S_IFMT)) {
        why = fmt::format("type {:o} on the source, {:o} in the checkpoint", st.mode & S_IFMT,
                          *f.recorded_mode & S_IFMT);
      } else if (!f.recorded_mode && !S_ISREG(st.mode)) {
        why = "not a regular file on the source";
      } else if (f.recorded_size && st.size != *f.recorded_size) {
        why = fmt::format("size {} on the source, {} in the checkpoint", st.size, *f.recorded_size);
      }
      if (!why.empty()) {
        f.state = File::State::kStale;
        f.stale_status =
            Status::permanent(EIO, fmt::format("{} is stale on {}: {}; refusing to serve it",
                                               f.path, source_->describe(), why));
        log::error("engine", "stale path={} reason=\"{}\"", f.path, why);
        result = f.stale_status;
      } else {
        f.info.size = f.recorded_size.value_or(st.size);
        f.info.source = st;
        Status cst;
        f.cache = cache_.file(f.path, f.info.size, cst, st);
        if (!f.cache) {
          f.state = File::State::kUnknown;
          result = Status::transient(EIO, fmt::format("cache for {}: {}", f.path, cst.message()));
          f.validate_error = result;
        } else {
          f.state = File::State::kReady;
          info = f.info;
        }
      }
    }
  }
  // Each pending request is served now, or failed with the reason; its jobs
  // are queued before anyone waiting for the file's information hears of it.
  for (auto& p : pending) p(out.jobs);
  for (auto& w : info_waiters) {
    out.then.push_back([w = std::move(w), result, info] { w(result, info); });
  }
}

// Queues what validations planned, then tells those who waited for them.
void FetchEngine::release(Validated& v) {
  enqueue_all(std::exchange(v.jobs, {}));
  for (auto& t : std::exchange(v.then, {})) t();
}

void FetchEngine::request(FileId id, uint64_t offset, uint64_t length, Priority priority,
                          Completion done) {
  std::vector<std::shared_ptr<Job>> jobs;
  request_into(id, offset, length, priority, std::move(done), jobs);
  enqueue_all(std::move(jobs));
}

void FetchEngine::request_many(std::vector<RangeRequest> requests, Priority priority) {
  std::vector<std::shared_ptr<Job>> jobs;
  for (auto& r : requests)
    request_into(r.file, r.offset, r.length, priority, std::move(r.done), jobs);
  enqueue_all(std::move(jobs));
}

// request(), with the fetch jobs it plans appended to `jobs` for the caller
// to enqueue (a request waiting for its file's validation enqueues its own).
void FetchEngine::request_into(FileId id, uint64_t offset, uint64_t length, Priority priority,
                               Completion done, std::vector<std::shared_ptr<Job>>& jobs) {
  File& f = *files_.at(id);
  ++counters_->requests;
  if (priority == Priority::kDemand) ++counters_->demand_requests;
  std::unique_lock lock(f.mutex);
  switch (f.state) {
    case File::State::kReady:
      lock.unlock();
      request_validated(f, offset, length, priority, std::move(done), jobs);
      return;
    case File::State::kStale: {
      auto st = f.stale_status;
      lock.unlock();
      if (done) done(st);
      return;
    }
    case File::State::kUnknown:
    case File::State::kValidating: {
      const bool first = f.state == File::State::kUnknown;
      // A reader waiting for a validation is as good as missing.
      done = parked_for_validation(priority, std::move(done));
      // Run once validation ends: served if it succeeded, failed if not.
      f.pending.push_back([this, &f, offset, length, priority, done](Jobs& later) mutable {
        std::unique_lock l(f.mutex);
        if (f.state == File::State::kReady) {
          l.unlock();
          request_validated(f, offset, length, priority, std::move(done), later);
        } else {
          auto st = f.state == File::State::kStale ? f.stale_status
                    : !f.validate_error.ok()
                        ? f.validate_error
                        : Status::transient(EIO, fmt::format("cannot validate {} on {}", f.path,
                                                             source_->describe()));
          l.unlock();
          if (done) done(st);
        }
      });
      if (first) {
        start_validation(f);
      } else if (auto raised = hasten_validation_locked(f, priority)) {
        jobs.push_back(std::move(raised));
      }
      return;
    }
  }
}

void FetchEngine::request_validated(File& f, uint64_t offset, uint64_t length, Priority priority,
                                    Completion done, std::vector<std::shared_ptr<Job>>& jobs) {
  const size_t planned = jobs.size();
  bool hit = false;
  {
    std::lock_guard lock(f.mutex);
    const uint64_t size = f.cache->size();
    const uint64_t end = offset >= size ? offset : offset + std::min(length, size - offset);
    if (offset >= end) {
      hit = true;
    } else {
      const Range want{align_down(offset, options_.block_size),
                       std::min(align_up(end, options_.block_size), size)};
      if (f.cache->present(want)) {
        hit = true;
      } else if (done) {
        f.waiters.push_back({want, parked(priority, std::move(done))});
      }
      if (!hit) {
        plan_fetches_locked(f, want, priority, jobs);
        if (priority == Priority::kDemand) ++counters_->demand_misses;
        // A reader that needs a fetch nobody had started: background work
        // gives way. One that waits for bytes already on their way does not.
        if (priority == Priority::kDemand && jobs.size() > planned) note_reader_waiting(f);
      }
      if (priority == Priority::kDemand) readahead_locked(f, offset, end, jobs);
    }
  }
  if (hit) {
    ++counters_->cache_hits;
    if (done) done({});
  }
}

// Caller holds f.mutex. Read-ahead follows a sequential run: a demand read
// that starts at or just before the run's last block and goes past it extends
// the run; the window is as long as the run so far (at least two blocks, at
// most readahead_max), so a short sequential read fetches little it will not
// use. Read-ahead is asked for in chunks of at least half a window, coalesced
// into few source requests, whenever less than half a window is left ahead of
// the reader. A read a little behind the run (the kernel and FUSE threads
// reorder requests) changes nothing; a read anywhere else starts a new run
// with no window: random reads fetch only their own blocks.
void FetchEngine::readahead_locked(File& f, uint64_t offset, uint64_t end,
                                   std::vector<std::shared_ptr<Job>>& jobs) {
  const uint64_t bs = options_.block_size;
  const uint64_t b0 = offset / bs;
  const uint64_t b1 = (end - 1) / bs;
  const uint64_t slack = std::max<uint64_t>(4, f.ra_window / bs);
  const bool near = f.read_before && b0 <= f.last_end + 1 && b1 + slack >= f.last_end;
  if (!near) {
    f.read_before = true;
    f.last_end = b1;
    f.run_blocks = b1 - b0 + 1;
    f.ra_window = 0;
    f.ra_frontier = 0;
    return;
  }
  if (b1 <= f.last_end) return;
  f.run_blocks += b1 - f.last_end;
  f.last_end = b1;
  f.ra_window = std::min(options_.readahead_max, std::max(2 * bs, f.run_blocks * bs));
  const uint64_t size = f.cache->size();
  const uint64_t from = std::min((b1 + 1) * bs, size);
  if (f.ra_frontier >= from + f.ra_window / 2) return;  // enough is on its way
  const Range ra{std::max(from, f.ra_frontier), std::min(size, from + f.ra_window)};
  f.ra_frontier = ra.end;
  if (!ra.empty()) plan_fetches_locked(f, ra, Priority::kReadAhead, jobs);
}

// Caller holds f.mutex. Queues fetches for the missing, not yet in-flight
// blocks of `range` (block-aligned), and raises queued jobs for its in-flight
// blocks to `priority`.
void FetchEngine::plan_fetches_locked(File& f, Range range, Priority priority,
                                      std::vector<std::shared_ptr<Job>>& jobs) {
  const uint64_t bs = options_.block_size;
  const uint64_t size = f.cache->size();
  for (Range m : f.cache->missing(range)) {
    m = {align_down(m.begin, bs), std::min(align_up(m.end, bs), size)};
    RangeSet todo;
    todo.insert(m);
    for (Range busy : f.inflight.intersect(m)) todo.erase(busy);
    for (Range part : todo.ranges()) {
      for (uint64_t at = part.begin; at < part.end; at += options_.max_request) {
        Range r{at, std::min(part.end, at + options_.max_request)};
        auto job = std::make_shared<Job>(Job::Kind::kFetch, &f, r, priority);
        job->deadline = Clock::now() + options_.retry_budget;
        job->backoff = options_.retry_initial;
        f.inflight.insert(r);
        f.jobs.push_back(job);
        jobs.push_back(std::move(job));
        ++counters_->inflight;
      }
    }
  }
  const int p = static_cast<int>(priority);
  for (auto& j : f.jobs) {
    if (j->priority.load() > p && !j->started.load() && overlaps(j->range, range)) {
      j->priority = p;
      jobs.push_back(j);  // queued again at the higher priority; the old entry is skipped
    }
  }
}

void FetchEngine::enqueue(std::shared_ptr<Job> job) {
  std::vector<std::shared_ptr<Job>> jobs;
  jobs.push_back(std::move(job));
  enqueue_all(std::move(jobs));
}

// Queues jobs together, so that workers find them all and can send them as
// few batches.
void FetchEngine::enqueue_all(std::vector<std::shared_ptr<Job>> jobs) {
  if (jobs.empty()) return;
  bool stopping;
  {
    std::lock_guard lock(queue_mutex_);
    stopping = stopping_;
    for (auto& job : jobs) {
      if (stopping) {
        job->started = true;  // failed below, outside the lock
      } else {
        queues_[static_cast<size_t>(job->priority.load())].push_back(job);
      }
    }
  }
  if (stopping) {
    for (auto& job : jobs) abandon(job, shutting_down());
    return;
  }
  for (size_t i = 0; i < std::min<size_t>(jobs.size(), workers_); ++i) {
    asio::post(pool_->pool, [this] { run_next(); });
  }
}

// Takes the most urgent job for a free worker. Queued fetches of the same
// priority go along with a fetch, as one pipelined source call, up to
// kMaxBatch jobs (kMaxBackgroundBatch in the background) and max_request
// bytes, and no more than their share of the
// free workers. Background jobs leave one worker to readers.
void FetchEngine::run_next() {
  constexpr size_t kMaxBatch = 32;
  // The fill's batches are larger: each costs its session a round trip (its
  // first OPENs) with nothing to receive.
  constexpr size_t kMaxBackgroundBatch = 128;
  std::vector<std::shared_ptr<Job>> batch;
  bool background = false;
  {
    std::lock_guard lock(queue_mutex_);
    if (running_ >= workers_) return;  // a job that ends posts run_next again
    const unsigned free = workers_ - running_;
    for (size_t p = 0; p < kPriorityCount && batch.empty(); ++p) {
      background = p == static_cast<size_t>(Priority::kBackground);
      if (background && workers_ > 1 && running_background_ >= workers_ - 1) break;
      auto& q = queues_[p];
      const size_t share =
          std::min(background ? kMaxBackgroundBatch : kMaxBatch, (q.size() + free - 1) / free);
      uint64_t bytes = 0;
      while (!q.empty() && batch.size() < std::max<size_t>(1, share)) {
        auto& j = q.front();
        if (j->started.load()) {
          q.pop_front();  // a duplicate entry of a job that already ran
          continue;
        }
        if (!batch.empty() &&
            (j->kind != Job::Kind::kFetch || batch[0]->kind != Job::Kind::kFetch ||
             bytes + j->range.size() > options_.max_request)) {
          break;
        }
        j->started = true;
        bytes += j->range.size();
        batch.push_back(std::move(j));
        q.pop_front();
      }
    }
    if (batch.empty()) return;
    ++running_;
    if (background) ++running_background_;
  }
  switch (batch[0]->kind) {
    case Job::Kind::kStat:
      run_stat(batch[0]);
      break;
    case Job::Kind::kStatMany:
      run_stat_many(batch[0]);
      break;
    case Job::Kind::kFetch:
      run_fetches(batch);
      break;
  }
  bool more = false;
  {
    std::lock_guard lock(queue_mutex_);
    --running_;
    if (background) --running_background_;
    for (const auto& q : queues_) more = more || !q.empty();
  }
  if (more) asio::post(pool_->pool, [this] { run_next(); });
}

void FetchEngine::run_stat(const std::shared_ptr<Job>& job) {
  if (Validated ready; validate_locally(*job->file, ready)) {
    release(ready);
    return;
  }
  SourceStat st;
  Status status = source_->stat(job->file->path, st);
  if (!status.ok() && retry_later(job, status)) return;
  Validated ready;
  on_validated(*job->file, status, st, ready);
  release(ready);
}

// What one fetch job of a batch has stored so far.
struct FetchEngine::Landing {
  std::shared_ptr<Job> job;
  CacheFile* cache = nullptr;
  uint64_t landed = 0;  // bytes in [range.begin, landed) are stored
  uint64_t woken = 0;   // blocks in [range.begin, woken) are announced
  Status cache_error;
};

// Runs a batch of fetch jobs as one source call: a source with round trips
// pipelines them (many small files over one SFTP session).
void FetchEngine::run_fetches(const std::vector<std::shared_ptr<Job>>& batch) {
  std::vector<Landing> landings(batch.size());
  std::vector<Source::ReadRange> ranges;
  ranges.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    Landing& l = landings[i];
    l.job = batch[i];
    File& f = *l.job->file;
    SourceStat validated;
    {
      std::lock_guard lock(f.mutex);
      l.cache = f.cache;
      validated = f.info.source;
    }
    const Range r = l.job->range;
    l.landed = l.woken = r.begin;
    ranges.push_back(
        {f.path, r.begin, r.size(),
         [this, &l](uint64_t at, std::span<const std::byte> data) { store_chunk(l, at, data); },
         validated});
  }
  const auto t0 = Clock::now();
  source_->read_many(ranges, [&](size_t i, const Status& status) {
    record_latency(Clock::now() - t0);
    ++counters_->fetch_requests;
    end_fetch(landings[i], status);
  });
}

// Stores a chunk of a fetch and wakes whoever waits on the blocks that just
// became whole.
void FetchEngine::store_chunk(Landing& l, uint64_t at, std::span<const std::byte> data) {
  if (!l.cache_error.ok()) return;
  if (auto st = l.cache->write_fetched(at, data); !st.ok()) {
    l.cache_error = st;
    return;
  }
  File& f = *l.job->file;
  const Range r = l.job->range;
  l.landed = at + data.size();
  f.fetched_bytes += data.size();
  counters_->fetched_bytes += data.size();
  const uint64_t done_to = l.landed >= r.end ? r.end : align_down(l.landed, options_.block_size);
  if (done_to <= l.woken) return;
  std::vector<Completion> ready;
  {
    std::lock_guard lock(f.mutex);
    f.inflight.erase({l.woken, done_to});
    for (auto it = f.waiters.begin(); it != f.waiters.end();) {
      if (overlaps(it->range, {l.woken, done_to}) && f.cache->present(it->range)) {
        ready.push_back(std::move(it->done));
        it = f.waiters.erase(it);
      } else {
        ++it;
      }
    }
  }
  l.woken = done_to;
  for (auto& c : ready) c({});
}

// A fetch ended: done, retried later, or its waiters fail.
void FetchEngine::end_fetch(Landing& l, Status status) {
  const auto& job = l.job;
  File& f = *job->file;
  const Range r = job->range;
  if (!l.cache_error.ok()) {
    status = Status::permanent(EIO, fmt::format("cache write failed: {}", l.cache_error.message()));
  } else if (status.ok() && l.woken < r.end) {
    // The source ended before the size it reported: the file changed.
    status = Status::permanent(EIO, fmt::format("{} ended at {} on {} but should be longer: it "
                                                "changed on the source",
                                                f.path, l.landed, source_->describe()));
  }
  if (status.ok()) {
    std::lock_guard lock(f.mutex);
    std::erase(f.jobs, job);
    --counters_->inflight;
    return;
  }
  if (status.errnum() == ESTALE) {
    // The file changed on the source since it was validated: bytes of the
    // new version must not join those cached, so it is served no more.
    std::lock_guard lock(f.mutex);
    if (f.state != File::State::kStale) {
      f.state = File::State::kStale;
      f.stale_status =
          Status::permanent(EIO, fmt::format("{} is stale on {}: {}; refusing to serve it", f.path,
                                             source_->describe(), status.message()));
      log::error("engine", "stale path={} reason=\"{}\"", f.path, status.message());
    }
    status = f.stale_status;
  }
  job->range = {l.woken, r.end};
  if (retry_later(job, status)) return;
  {
    std::lock_guard lock(f.mutex);
    std::erase(f.jobs, job);
  }
  --counters_->inflight;
  fail_blocks(f, job->range, Status::transient(EIO, status.message()));
}

// Schedules the job again after its back-off if the failure is transient and
// the budget allows; false if the caller must give up.
bool FetchEngine::retry_later(const std::shared_ptr<Job>& job, const Status& status) {
  const auto now = Clock::now();
  if (status.errnum() == ECANCELED) return false;  // stopping: not the source's failure
  if (!status.retryable() || now + job->backoff >= job->deadline) {
    ++counters_->errors;
    log::error("engine", "giving up path={} off={} len={} reason=\"{}\"", job->file->path,
               job->range.begin, job->range.size(), status.message());
    return false;
  }
  auto timer = std::make_shared<asio::steady_timer>(pool_->pool, job->backoff);
  {
    // Checked and registered under timers_mutex, which shutdown takes after
    // setting stopping_ to cancel every registered timer: none slips by.
    std::lock_guard timers(pool_->timers_mutex);
    std::lock_guard lock(queue_mutex_);
    if (stopping_) return false;
    pool_->retry_timers.insert(timer);
  }
  ++counters_->retries;
  ++counters_->retrying;
  log::warn("engine", "retry path={} off={} len={} in_ms={} reason=\"{}\"", job->file->path,
            job->range.begin, job->range.size(), job->backoff.count(), status.message());
  job->backoff = std::min(options_.retry_max, job->backoff * 2);
  timer->async_wait([this, job, timer](const boost::system::error_code& ec) {
    {
      std::lock_guard lock(pool_->timers_mutex);
      pool_->retry_timers.erase(timer);
    }
    --counters_->retrying;
    job->started = false;
    if (ec) {
      // Cancelled at shutdown.
      job->started = true;
      if (job->kind == Job::Kind::kFetch) {
        std::lock_guard lock(job->file->mutex);
        std::erase(job->file->jobs, job);
      }
      abandon(job, shutting_down());
      return;
    }
    enqueue(job);
  });
  return true;
}

// Fails a job that will not run (shutdown): its waiters get `status`.
void FetchEngine::abandon(const std::shared_ptr<Job>& job, const Status& status) {
  Validated failed;  // requests waiting for a validation that failed plan nothing
  switch (job->kind) {
    case Job::Kind::kFetch:
      --counters_->inflight;
      fail_blocks(*job->file, job->range, status);
      break;
    case Job::Kind::kStat:
      on_validated(*job->file, status, {}, failed);
      break;
    case Job::Kind::kStatMany:
      for (File* f : job->batch) on_validated(*f, status, {}, failed);
      break;
  }
  release(failed);
}

// Gives up on `range` of f: its blocks are no longer in flight and every
// waiter that needs one of them and lacks it fails with `status`.
void FetchEngine::fail_blocks(File& f, Range range, const Status& status) {
  std::vector<Completion> failed;
  {
    std::lock_guard lock(f.mutex);
    f.inflight.erase(range);
    for (auto it = f.waiters.begin(); it != f.waiters.end();) {
      if (overlaps(it->range, range) && !f.cache->present(it->range)) {
        failed.push_back(std::move(it->done));
        it = f.waiters.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : failed) c(status);
}

void FetchEngine::schedule_flush() {
  // A handler that was already running when shutdown cancelled the timer
  // must not arm it again, or joining the pool would wait forever; and
  // arming it races with that cancel unless both hold queue_mutex_.
  std::lock_guard lock(queue_mutex_);
  if (stopping_) return;
  pool_->flush_timer.expires_after(options_.flush_interval);
  pool_->flush_timer.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    if (auto st = cache_.flush_all(); !st.ok()) {
      log::error("engine", "cache flush failed: {}", st.message());
    }
    schedule_flush();
  });
}

void FetchEngine::record_latency(Clock::duration d) {
  const double s = std::chrono::duration<double>(d).count();
  const auto ms = static_cast<uint64_t>(s * 1000);
  size_t bucket = 0;
  while (bucket + 1 < 16 && (1ull << bucket) <= ms) ++bucket;
  std::lock_guard lock(counters_->latency_mutex);
  ++counters_->latency_count;
  counters_->latency_sum_s += s;
  counters_->latency_max_s = std::max(counters_->latency_max_s, s);
  ++counters_->latency_ms_log2[bucket];
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  if (ns < counters_->latency_min_ns.load(std::memory_order_relaxed)) {
    counters_->latency_min_ns.store(ns, std::memory_order_relaxed);
  }
}

std::chrono::nanoseconds FetchEngine::fastest_fetch() const {
  return std::chrono::nanoseconds(counters_->latency_min_ns.load(std::memory_order_relaxed));
}

// A reader's completion that has to wait: background work gives way to
// readers while any waits (and for a while after a miss).
template <typename Done>
Done FetchEngine::parked(Priority priority, Done done) {
  if (priority != Priority::kDemand || !done) return done;
  ++counters_->readers_waiting;
  counters_->last_wait_ns.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  return [c = counters_.get(), done = std::move(done)](const auto&... args) {
    c->last_wait_ns.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    --c->readers_waiting;
    done(args...);
  };
}

// A reader's completion that waits for its file's validation.
template <typename Done>
Done FetchEngine::parked_for_validation(Priority priority, Done done) {
  if (priority != Priority::kDemand || !done) return done;
  ++counters_->readers_validating;
  return parked(priority, Done([c = counters_.get(), done = std::move(done)](const auto&... args) {
                  --c->readers_validating;
                  done(args...);
                }));
}

std::chrono::steady_clock::time_point FetchEngine::last_reader_wait() const {
  return Clock::time_point(
      Clock::duration(counters_->last_wait_ns.load(std::memory_order_relaxed)));
}

bool FetchEngine::readers_await_validation() const {
  return counters_->readers_validating.load(std::memory_order_relaxed) > 0;
}

FetchEngine::FileId FetchEngine::last_missed_file() const {
  return counters_->last_missed_file.load(std::memory_order_relaxed);
}

bool FetchEngine::validating() const {
  return counters_->validating.load(std::memory_order_relaxed) > 0;
}

uint64_t FetchEngine::demand_requests() const {
  return counters_->demand_requests.load(std::memory_order_relaxed);
}

bool FetchEngine::readers_waiting() const {
  return counters_->readers_waiting.load(std::memory_order_relaxed) > 0;
}

// Background work gives way to readers for a while after this.
void FetchEngine::note_reader_waiting(const File& f) {
  counters_->last_missed_file.store(f.id, std::memory_order_relaxed);
  counters_->last_demand_miss_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                           std::chrono::steady_clock::now().time_since_epoch())
                                           .count(),
                                       std::memory_order_relaxed);
}

std::chrono::steady_clock::time_point FetchEngine::last_demand_miss() const {
  return std::chrono::steady_clock::time_point(
      std::chrono::nanoseconds(counters_->last_demand_miss_ns.load(std::memory_order_relaxed)));
}

EngineStats FetchEngine::stats() const {
  EngineStats s;
  s.fetched_bytes = counters_->fetched_bytes;
  s.fetch_requests = counters_->fetch_requests;
  s.requests = counters_->requests;
  s.cache_hits = counters_->cache_hits;
  s.demand_misses = counters_->demand_misses;
  s.demand_requests = counters_->demand_requests;
  s.inflight = counters_->inflight;
  s.retries = counters_->retries;
  s.errors = counters_->errors;
  std::lock_guard lock(counters_->latency_mutex);
  s.latency_count = counters_->latency_count;
  s.latency_sum_s = counters_->latency_sum_s;
  s.latency_max_s = counters_->latency_max_s;
  s.latency_ms_log2 = counters_->latency_ms_log2;
  if (counters_->latency_count > 0) {
    s.latency_min_s = std::chrono::duration<double>(fastest_fetch()).count();
  }
  return s;
}

std::optional<uint64_t> FetchEngine::known_size(FileId id) const {
  File& f = *files_.at(id);
  std::lock_guard lock(f.mutex);
  return f.cache ? std::optional(f.cache->size()) : f.recorded_size;
}

FileStats FetchEngine::file_stat(FileId id, bool with_path) const {
  File& f = *files_.at(id);  // its mutex is not const
  FileStats fs;
  if (with_path) fs.path = f.path;
  fs.fetched_bytes = f.fetched_bytes;
  std::lock_guard lock(f.mutex);
  fs.size = f.recorded_size;
  fs.stale = f.state == File::State::kStale;
  if (f.cache) {
    const auto c = f.cache->counts();
    fs.size = c.size;
    fs.present_bytes = c.present_bytes;
    fs.local_bytes = c.local_bytes;
    fs.durable = !c.dirty;
  }
  return fs;
}

std::vector<FileStats> FetchEngine::file_stats(bool with_paths) const {
  std::vector<FileStats> out;
  out.reserve(files_.size());
  for (FileId id = 0; id < files_.size(); ++id) out.push_back(file_stat(id, with_paths));
  return out;
}

Status FetchEngine::flush_cache() {
  return cache_.flush_all();
}

SourceState FetchEngine::source_state() const {
  if (counters_->retrying > 0) return SourceState::kRetrying;
  return source_->state();
}

}  // namespace lazyfs
