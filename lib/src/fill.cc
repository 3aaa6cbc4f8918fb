#include "lazyfs/fill.h"

#include <fmt/core.h>
#include <algorithm>
#include <set>
#include <unordered_map>

#include "lazyfs/log.h"

namespace lazyfs {

using Clock = std::chrono::steady_clock;

// How often a paused fill looks again while a reader waits.
constexpr auto kRecheck = std::chrono::milliseconds(10);

// adapt()'s trials: the first kSettle of one is not measured (the other
// way's requests drain); then it lasts kMinTrial and kMinReads reads, or
// kMaxTrial. The way that lost is tried again after kInitialHold trials of
// the winner, twice as many each time it loses again, up to kMaxHold.
constexpr auto kSettle = std::chrono::milliseconds(30);
constexpr auto kMinTrial = std::chrono::milliseconds(60);
constexpr auto kMaxTrial = std::chrono::seconds(1);
constexpr uint64_t kMinReads = 16;
constexpr unsigned kInitialHold = 8;
constexpr unsigned kMaxHold = 64;
// Running beside readers must serve them this much faster to be kept: a
// trial's rate is noisy, and pausing is the safe way.
constexpr double kAlongsideMargin = 1.1;
// A way's rate is over all its trials, each older one weighing this much
// less: one trial of some 16 reads is too noisy to decide on.
constexpr double kKeep = 0.75;
// Where the source answers faster than this (its fastest request so far), a
// reader's miss waits for no round trip that the fill could use: running
// beside the readers only takes what they need (the CPUs, the cache's file
// system), and each trial of it costs them (0.1-0.2 s of a many-small
// restore on loopback). adapt() pauses there, without trials.
constexpr auto kNoRoundTrip = std::chrono::milliseconds(2);

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
  if (options_.alongside == 0) options_.adapt = false;
  alongside_now_ = options_.alongside > 0 && !options_.adapt;
  hold_ = kInitialHold;
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
  p.alongside = alongside_now_ && (filling_small_ || !options_.adapt);
  p.reads_per_s_pausing = published_rate_[0];
  p.reads_per_s_alongside = published_rate_[1];
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
  // Where each small file stands in the order: a reader that misses one
  // makes the fill go on from the files after it (coming back for those it
  // skipped once it reaches the last small file), so that running beside
  // readers it fetches what they read next rather than what they passed.
  std::unordered_map<FetchEngine::FileId, size_t> small_at;
  for (size_t i = 0; i < items.size() && items[i].size <= options_.small_file; ++i) {
    small_at.emplace(items[i].id, i);
  }
  const size_t n_small = small_at.size();  // items[0, n_small) are the small files
  size_t small_left = n_small;
  size_t left = items.size();
  std::vector<bool> visited(items.size());
  size_t cursor = 0;
  auto seen_miss = engine_.last_demand_miss();
  const auto next_item = [&]() -> const Item* {
    if (left == 0) return nullptr;
    if (const auto miss = engine_.last_demand_miss(); miss != seen_miss) {
      seen_miss = miss;
      if (auto it = small_at.find(engine_.last_missed_file()); it != small_at.end()) {
        cursor = it->second + 1;
      }
    }
    // The small files first, then the large ones.
    const size_t begin = small_left > 0 ? 0 : n_small;
    const size_t end = small_left > 0 ? n_small : items.size();
    if (cursor < begin || cursor >= end) cursor = begin;
    while (visited[cursor]) cursor = cursor + 1 < end ? cursor + 1 : begin;
    visited[cursor] = true;
    --left;
    if (cursor < n_small) --small_left;
    return &items[cursor++];
  };
  while (const Item* next = next_item()) {
    const Item& item = *next;
    if (item.size <= options_.small_file) {
      filling_small_ = true;
      // One request per file, validated on the way; the engine skips what
      // is there.
      CacheFile* cache = engine_.cache_file(item.id);
      if (cache && cache->present({0, cache->size()})) continue;
      const bool missing = readers_missing();
      const uint64_t alongside = alongside_budget();
      if (missing && alongside == 0) {
        ok = send_group() && pause_for_readers() && issue({{item.id, 0, item.size}});
      } else {
        group.push_back({item.id, 0, item.size});
        group_bytes += item.size;
        const uint64_t limit = missing ? std::min(options_.chunk, alongside) : options_.chunk;
        if (group.size() >= kRequestsPerWorker || group_bytes >= limit) send_group();
      }
    } else if (send_group()) {
      filling_small_ = false;
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
    const uint64_t alongside = alongside_budget();
    if (missing && alongside == 0 && !pause_for_readers()) return false;
    uint64_t n = length;
    if (missing && alongside == 0) n = std::min(length, bs - offset % bs);
    if (missing && alongside > 0) {
      n = std::min(length, std::max(bs, alongside / bs * bs) - offset % bs);
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
    auto quiet_at = std::max(engine_.last_reader_wait(), started_) + options_.yield_after;
    // A reader still waiting (for a fetch or a validation) is checked on.
    if (engine_.readers_waiting()) quiet_at = std::max(quiet_at, Clock::now() + kRecheck);
    if (Clock::now() >= quiet_at || alongside_budget() > 0) break;
    // Adapting, it looks often: a trial may end.
    cv_.wait_until(lock,
                   std::min({quiet_at, limit,
                             options_.adapt ? Clock::now() + kRecheck : Clock::time_point::max()}));
  }
  return !stop_ && progress_.state == FillState::kRunning;
}

// Readers are missing while one waits for a fetch or a validation, and for
// yield_after after such a wait. That counts a wait for a fetch the fill (or
// read-ahead) had started: the fill's further requests would queue ahead of
// that reader's next one (at 100 Mbit/s, after a trial of running beside a
// many-small restore, the restore caught up with the fill and only waited for
// its fetches, so a fill that went on at full speed kept it 1.26x slower). A
// restore starts reading right after the mount: the fill's first
// yield_after counts as such a time.
bool BackgroundFill::readers_missing() const {
  if (engine_.readers_waiting()) return true;
  const auto since = std::max(engine_.last_reader_wait(), started_);
  return Clock::now() - since < options_.yield_after;
}

// The bytes the fill may keep in flight while readers are missing: 0 while
// it pauses for them. Adapting, it pauses for them while it fills large
// files: their pieces queue ahead of a reader's block on the link (at
// 1 Gbit/s trials beside a big-sparse restore made it 1.3x slower), and the
// fill does not fetch what the readers read next there.
uint64_t BackgroundFill::alongside_budget() {
  if (options_.adapt && !filling_small_) return 0;
  adapt();
  return alongside_now_ ? options_.alongside : 0;
}

// Adapting, the fill finds out which way of giving way to missing readers
// serves them faster: pausing (which leaves them the link, the CPUs and the
// source) or running beside them (which, where a miss waits mostly for the
// link's round trip, uses what lies idle meanwhile, and may fetch the files
// they read next). It runs each way in turn for a trial, measuring the
// readers' reads per second (the engine's demand requests, cache hits
// included), and keeps the faster (running beside them only if clearly
// so, by kAlongsideMargin). The slower way is
// tried again now and then (see kInitialHold), so that a change is noticed,
// at a small cost while it loses. A trial counts only while readers are
// missing throughout. Called often, on the fill's thread.
void BackgroundFill::adapt() {
  if (!options_.adapt) return;
  if (engine_.fastest_fetch() < kNoRoundTrip) {
    if (!no_round_trip_) {
      no_round_trip_ = true;
      log::info("fill", "pausing for readers without trials: the source answers within {} ms",
                kNoRoundTrip.count());
    }
    alongside_now_ = false;
    trial_.start = {};
    return;
  }
  const auto now = Clock::now();
  const uint64_t reads = engine_.demand_requests();
  // Missing readers, not the fill's first moments (which readers_missing()
  // counts as such); and not while a reader waits for its file's validation
  // (at mount), which it does whatever the fill does. Other files still
  // being validated do not void a trial: the reader waits only for its own.
  if ((!engine_.readers_waiting() && now - engine_.last_reader_wait() >= options_.yield_after) ||
      engine_.readers_await_validation()) {
    trial_.start = {};  // the trial says nothing
    return;
  }
  if (trial_.start == Clock::time_point{}) {
    trial_ = {alongside_now_, now, now, reads, false};
    return;
  }
  if (!trial_.measuring) {
    if (now - trial_.start < kSettle) return;
    trial_.measuring = true;
    trial_.from = now;
    trial_.reads_at = reads;
    return;
  }
  const auto span = now - trial_.from;
  const uint64_t n = reads - trial_.reads_at;
  if (span < kMinTrial || (n < kMinReads && span < kMaxTrial)) return;

  const int way = trial_.alongside ? 1 : 0;
  reads_[way] = kKeep * reads_[way] + static_cast<double>(n);
  seconds_[way] = kKeep * seconds_[way] + std::chrono::duration<double>(span).count();
  rate_[way] = reads_[way] / seconds_[way];
  published_rate_[way] = rate_[way];
  ++trials_[way];
  bool next = best_;
  if (trials_[1 - way] == 0) {
    next = !trial_.alongside;  // the first trial of the other way
  } else if (trial_.alongside != best_) {
    // The other way was tried: it wins, or waits longer for its next try.
    const bool winner = rate_[1] > kAlongsideMargin * rate_[0];
    if (winner != best_) {
      best_ = winner;
      hold_ = kInitialHold;
    } else {
      hold_ = std::min(2 * hold_, kMaxHold);
    }
    log::info("fill", "{} readers reads_per_s_pausing={:.0f} reads_per_s_alongside={:.0f}",
              best_ ? "running beside" : "pausing for", rate_[0], rate_[1]);
    held_ = 0;
    next = best_;
  } else if (++held_ >= hold_) {
    next = !best_;
  }
  alongside_now_ = next;
  trial_ = {next, now, now, reads, false};
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
      const uint64_t alongside = alongside_budget();
      return alongside > 0 && in_flight_bytes_ + bytes <= alongside;
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
