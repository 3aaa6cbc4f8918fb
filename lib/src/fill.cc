#include "lazyfs/fill.h"

#include <fmt/core.h>
#include <algorithm>
#include <set>

#include "lazyfs/log.h"

namespace lazyfs {

using Clock = std::chrono::steady_clock;

// How often a paused fill looks again while a reader waits.
constexpr auto kRecheck = std::chrono::milliseconds(10);

const char* fill_state_name(FillState state) {
  switch (state) {
    case FillState::kRunning:
      return "running";
    case FillState::kComplete:
      return "complete";
    case FillState::kFailed:
      return "failed";
    case FillState::kStopped:
      return "stopped";
  }
  return "?";
}

BackgroundFill::BackgroundFill(FetchEngine& engine, FillOptions options)
    : engine_(engine),
      options_(std::move(options)),
      max_in_flight_(2 * std::max(1u, engine.workers() - 1) * kRequestsPerWorker),
      started_(Clock::now()),
      last_issue_(started_) {
  const uint64_t bs = engine_.options().block_size;
  if (options_.rate > 0) options_.chunk = std::min(options_.chunk, std::max(bs, options_.rate / 4));
  // One request, one source transfer: a larger range would be split into
  // several engine jobs, which could take every worker the in-flight limit
  // means to leave to readers.
  options_.chunk = std::min(options_.chunk, engine_.options().max_request);
  options_.chunk = std::max(bs, options_.chunk / bs * bs);
  max_bytes_in_flight_ = 2 * std::max(1u, engine.workers() - 1) * options_.chunk;
  thread_ = std::thread([this] { run(); });
}

BackgroundFill::~BackgroundFill() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
    cv_.notify_all();
  }
  thread_.join();
}

FillProgress BackgroundFill::progress() const {
  std::lock_guard lock(mutex_);
  FillProgress p = progress_;
  const auto now = Clock::now();
  uint64_t bytes = 0;
  auto oldest = now;
  for (const auto& [t, n] : samples_) {
    if (now - t > std::chrono::seconds(5)) continue;
    bytes += n;
    oldest = std::min(oldest, t);
  }
  const double span = std::chrono::duration<double>(now - oldest).count();
  p.rate = span > 0.2 ? static_cast<double>(bytes) / span : 0;
  return p;
}

void BackgroundFill::run() {
  // The order: the trace's files first, then the rest; small files before
  // large ones, each group in that order.
  std::vector<FetchEngine::FileId> order;
  std::set<FetchEngine::FileId> seen;
  for (auto id : options_.first) {
    if (id < engine_.file_count() && seen.insert(id).second) order.push_back(id);
  }
  for (FetchEngine::FileId id = 0; id < engine_.file_count(); ++id) {
    if (seen.insert(id).second) order.push_back(id);
  }
  struct Item {
    FetchEngine::FileId id;
    uint64_t size;
  };
  // Sizes are the checkpoint's, so the fill starts at once, while the mount
  // is still validating files; a file recorded without one is validated
  // first.
  std::vector<Item> items;
  for (auto id : order) {
    auto size = engine_.known_size(id);
    if (!size) {
      FileInfo info;
      if (!validate(id, info)) return;
      size = info.size;
    }
    items.push_back({id, *size});
  }
  std::stable_partition(items.begin(), items.end(),
                        [&](const Item& i) { return i.size <= options_.small_file; });

  pace_start_ = Clock::now();
  bool ok = true;
  // Small files go in groups, which the engine sends as pipelined batches;
  // one at a time while readers are missing (or groups of `alongside`
  // bytes).
  std::vector<Piece> group;
  uint64_t group_bytes = 0;
  const auto send_group = [&] {
    if (!group.empty()) ok = ok && issue(group);
    group.clear();
    group_bytes = 0;
    return ok;
  };
  for (const auto& item : items) {
    if (item.size <= options_.small_file) {
      // One request per file, validated on the way; the engine skips what
      // is there.
      CacheFile* cache = engine_.cache_file(item.id);
      if (cache && cache->present({0, cache->size()})) continue;
      const bool missing = readers_missing();
      if (missing && options_.alongside == 0) {
        ok = send_group() && pause_for_readers() && issue({{item.id, 0, item.size}});
      } else {
        group.push_back({item.id, 0, item.size});
        group_bytes += item.size;
        const uint64_t limit =
            missing ? std::min(options_.chunk, options_.alongside) : options_.chunk;
        if (group.size() >= kRequestsPerWorker || group_bytes >= limit) send_group();
      }
    } else if (send_group()) {
      FileInfo info;
      if (!validate(item.id, info)) break;
      CacheFile* cache = engine_.cache_file(item.id);
      for (Range r : cache->missing({0, cache->size()})) {
        for (uint64_t at = r.begin; ok && at < r.end; at += options_.chunk) {
          ok = fill_range(item.id, at, std::min(options_.chunk, r.end - at));
        }
        if (!ok) break;
      }
    }
    if (!ok) break;
  }
  send_group();

  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
  if (progress_.state != FillState::kRunning) return;
  if (stop_) {
    progress_.state = FillState::kStopped;
    return;
  }
  // Complete means the source is no longer needed, also after a crash: the
  // cache's maps must say so on disk first.
  lock.unlock();
  const auto flush_start = Clock::now();
  Status flushed = engine_.flush_cache();
  const double flush_s = std::chrono::duration<double>(Clock::now() - flush_start).count();
  lock.lock();
  if (progress_.state != FillState::kRunning) return;
  if (!flushed.ok()) {
    progress_.state = FillState::kFailed;
    progress_.error = "cannot make the cache durable: " + flushed.message();
    log::error("fill", "stopped reason=\"{}\"", progress_.error);
    return;
  }
  progress_.state = FillState::kComplete;
  log::info("fill", "complete bytes={} flush_s={:.3f}", progress_.requested, flush_s);
}

// Waits for the file's validation (done at mount start, or now); false,
// with the fill failed, if the file cannot be served.
bool BackgroundFill::validate(FetchEngine::FileId id, FileInfo& out) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  Status status;
  engine_.file_info(
      id,
      [&](const Status& st, const FileInfo& info) {
        std::lock_guard lock(m);
        status = st;
        out = info;
        done = true;
        cv.notify_all();
      },
      Priority::kBackground);
  {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return done; });
  }
  if (status.ok()) return true;
  std::lock_guard lock(mutex_);
  progress_.state = FillState::kFailed;
  progress_.error = status.message();
  log::error("fill", "stopped reason=\"{}\"", status.message());
  return false;
}

// Asks for one range of a large file at background priority, in block-sized
// pieces one at a time while readers are missing (or pieces of `alongside`
// bytes); false if the fill must end (stopped or failed).
bool BackgroundFill::fill_range(FetchEngine::FileId id, uint64_t offset, uint64_t length) {
  const uint64_t bs = engine_.options().block_size;
  while (length > 0) {
    const bool missing = readers_missing();
    if (missing && options_.alongside == 0 && !pause_for_readers()) return false;
    uint64_t n = length;
    if (missing && options_.alongside == 0) n = std::min(length, bs - offset % bs);
    if (missing && options_.alongside > 0) {
      n = std::min(length, std::max(bs, options_.alongside / bs * bs) - offset % bs);
    }
    if (!issue({{id, offset, n}})) return false;
    offset += n;
    length -= n;
  }
  return true;
}

// While readers keep missing, waits until they have been quiet for
// yield_after, but no longer than kMaxPause since the fill's last request:
// a process that reads steadily slows the fill to a block per kMaxPause, and
// never stops it. False if the fill must end.
bool BackgroundFill::pause_for_readers() {
  constexpr auto kMaxPause = std::chrono::seconds(1);
  const auto limit = last_issue_ + kMaxPause;
  std::unique_lock lock(mutex_);
  while (!stop_ && progress_.state == FillState::kRunning && Clock::now() < limit) {
    auto quiet_at = std::max(engine_.last_demand_miss(), started_) + options_.yield_after;
    // A reader still waiting (for a fetch or a validation) is checked on.
    if (engine_.readers_waiting()) quiet_at = std::max(quiet_at, Clock::now() + kRecheck);
    if (Clock::now() >= quiet_at) break;
    cv_.wait_until(lock, std::min(quiet_at, limit));
  }
  return !stop_ && progress_.state == FillState::kRunning;
}

// Readers are missing while one waits for a fetch or a validation, and for
// yield_after after one had to start a fetch. A restore starts reading right
// after the mount: the fill's first yield_after counts as such a time.
bool BackgroundFill::readers_missing() const {
  if (engine_.readers_waiting()) return true;
  const auto since = std::max(engine_.last_demand_miss(), started_);
  return Clock::now() - since < options_.yield_after;
}

// Sends requests once the pace allows and the fill's requests in flight
// leave room for them: one at a time while readers are missing (or up to
// `alongside` bytes), otherwise up to max_in_flight_ requests and
// max_bytes_in_flight_ bytes.
bool BackgroundFill::issue(const std::vector<Piece>& pieces) {
  uint64_t bytes = 0;
  for (const auto& p : pieces) bytes += p.length;
  pace(bytes);
  std::unique_lock lock(mutex_);
  const auto room = [&] {
    if (in_flight_ == 0) return true;
    if (readers_missing()) {
      return options_.alongside > 0 && in_flight_bytes_ + bytes <= options_.alongside;
    }
    return in_flight_ + pieces.size() <= max_in_flight_ &&
           in_flight_bytes_ + bytes <= max_bytes_in_flight_;
  };
  // Completions wake it; the bounded wait notices readers going quiet.
  while (!stop_ && progress_.state == FillState::kRunning && !room()) {
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
  if (stop_ || progress_.state != FillState::kRunning) return false;
  in_flight_ += static_cast<unsigned>(pieces.size());
  in_flight_bytes_ += bytes;
  progress_.requested += bytes;
  last_issue_ = Clock::now();
  lock.unlock();
  std::vector<FetchEngine::RangeRequest> requests;
  for (const auto& p : pieces) {
    requests.push_back({p.file, p.offset, p.length,
                        [this, length = p.length](const Status& st) { landed(length, st); }});
  }
  engine_.request_many(std::move(requests), Priority::kBackground);
  return true;
}

void BackgroundFill::landed(uint64_t length, const Status& st) {
  std::lock_guard l(mutex_);
  --in_flight_;
  in_flight_bytes_ -= length;
  if (st.ok()) {
    samples_.emplace_back(Clock::now(), length);
    if (samples_.size() > 4096) samples_.erase(samples_.begin(), samples_.begin() + 2048);
  } else if (progress_.state == FillState::kRunning && !stop_) {
    progress_.state = FillState::kFailed;
    progress_.error = st.message();
    log::error("fill", "stopped reason=\"{}\"", st.message());
  }
  cv_.notify_all();
}

// Keeps the fill's average rate at options_.rate (if set).
void BackgroundFill::pace(uint64_t bytes) {
  if (options_.rate == 0) return;
  const auto due =
      pace_start_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
                        static_cast<double>(paced_bytes_) / static_cast<double>(options_.rate)));
  paced_bytes_ += bytes;
  std::unique_lock lock(mutex_);
  cv_.wait_until(lock, due, [&] { return stop_; });
}

}  // namespace lazyfs
