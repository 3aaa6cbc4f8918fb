// BackgroundFill: fetches every byte of every served file that is not yet in
// the cache, at the lowest priority, so the source can be released once the
// fill is complete. Small files first, each in one request, queued in groups
// that the engine sends as pipelined batches; then large files in large
// ranges. Files named by a trace come first, in its order. The engine keeps
// one worker free of background work for readers; the fill bounds its own
// requests and bytes in flight, and can cap its bandwidth.
// While readers are missing (one waits for the source, for a fetch or a
// validation, or did so in the last `yield_after` ms, also where it waited
// for a fetch another had started; or the fill started less than that long
// ago: a restore reads right after the mount) it gives way, in one of two
// ways:
// - it pauses until readers have been quiet that long, but sends at least
//   one request (a small file, or a block of a large one) a second, so that
//   its transfers do not queue ahead of theirs on the link or take their
//   CPU, and a steady reader cannot starve it;
// - or it runs beside them with at most `alongside` bytes in flight: where
//   a miss waits mostly for the link's round trip, the CPUs and the link are
//   idle meanwhile, and the fill may even fetch what they read next.
// Adapting, it tries both in turn and keeps the one under which readers are
// served faster (see adapt()); where the source answers within 2 ms it
// pauses without trying.
// Resuming after a restart is free: only missing bytes are requested.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lazyfs/engine.h"

namespace lazyfs {

struct FillOptions {
  uint64_t rate = 0;                       // bytes per second; 0: as fast as it goes
  uint64_t small_file = 1 << 20;           // files up to this size go first, whole
  uint64_t chunk = 4 << 20;                // request size for large files
  std::vector<FetchEngine::FileId> first;  // files to fill first, in order (a trace's)
  // Back off while a demand read missed less than this long ago.
  std::chrono::milliseconds yield_after{250};
  // Bytes the fill may keep in flight while readers are missing; 0: it
  // pauses for them (a block at a time, at most a second apart). More
  // releases the source sooner where the restore leaves the CPUs and the
  // link idle, at a cost to the restore where it does not.
  uint64_t alongside = 0;
  // With `alongside` > 0: run beside missing readers only while that serves
  // them at least as fast as pausing does, as measured (adapt()).
  bool adapt = false;
};

enum class FillState { kRunning, kComplete, kFailed, kStopped };
const char* fill_state_name(FillState state);

struct FillProgress {
  FillState state = FillState::kRunning;
  std::string error;       // why it failed
  uint64_t requested = 0;  // bytes it asked the engine for
  double rate = 0;         // bytes per second over the last few seconds
  // Whether it runs beside missing readers (else it pauses for them).
  bool alongside = false;
  // Adapting: readers' reads per second under each way, over its trials,
  // older ones weighing less (0: not tried).
  double reads_per_s_pausing = 0;
  double reads_per_s_alongside = 0;
};

class BackgroundFill {
 public:
  // Starts at once, on its own thread.
  BackgroundFill(FetchEngine& engine, FillOptions options);
  // Stops (waiting for its requests in flight).
  ~BackgroundFill();
  BackgroundFill(const BackgroundFill&) = delete;
  BackgroundFill& operator=(const BackgroundFill&) = delete;

  FillProgress progress() const;

 private:
  void run();
  bool validate(FetchEngine::FileId id, FileInfo& out);
  bool fill_range(FetchEngine::FileId id, uint64_t offset, uint64_t length);
  struct Piece {
    FetchEngine::FileId file;
    uint64_t offset;
    uint64_t length;
  };
  bool issue(const std::vector<Piece>& pieces);
  void landed(uint64_t length, const Status& st);
  bool readers_missing() const;
  uint64_t alongside_budget();
  void adapt();
  bool pause_for_readers();
  void pace(uint64_t bytes);

  FetchEngine& engine_;
  FillOptions options_;
  // Small files queued together: the engine sends up to 128 queued
  // background fetches as one pipelined batch.
  static constexpr unsigned kRequestsPerWorker = 64;
  // In flight at most: two batches (requests) and two chunks (bytes) per
  // worker the fill may use, so a worker that ends one finds the next queued.
  unsigned max_in_flight_;
  uint64_t max_bytes_in_flight_ = 0;
  std::chrono::steady_clock::time_point started_;
  std::chrono::steady_clock::time_point last_issue_;  // the fill thread's own

  // adapt()'s state, the fill thread's own. A trial runs one way (pausing:
  // index 0, alongside: 1) while readers keep missing: kSettle not counted,
  // then measured.
  struct Trial {
    bool alongside = false;
    std::chrono::steady_clock::time_point start{};  // none running: the epoch
    std::chrono::steady_clock::time_point from{};   // measured from here
    uint64_t reads_at = 0;                          // the engine's demand requests then
    bool measuring = false;
  } trial_;
  double reads_[2] = {0, 0};     // readers' reads in each way's trials, decayed
  double seconds_[2] = {0, 0};   // and the trials' time
  double rate_[2] = {0, 0};      // their quotient: readers' reads per second
  unsigned trials_[2] = {0, 0};  // trials of each way so far
  bool best_ = false;            // the way that served them faster
  unsigned held_ = 0;            // trials of best_ since the other was last tried
  unsigned hold_ = 0;            // trials of best_ before the other is tried again
  bool no_round_trip_ = false;   // the source answers too fast for trials (logged)
  std::atomic<bool> alongside_now_{false};
  std::atomic<bool> filling_small_{true};               // small files, not large ones
  std::atomic<double> published_rate_[2] = {0.0, 0.0};  // rate_, for progress()

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;             // guarded by mutex_
  unsigned in_flight_ = 0;        // guarded by mutex_
  uint64_t in_flight_bytes_ = 0;  // guarded by mutex_
  FillProgress progress_;         // guarded by mutex_
  std::vector<std::pair<std::chrono::steady_clock::time_point, uint64_t>> samples_;  // guarded
  std::chrono::steady_clock::time_point pace_start_;
  uint64_t paced_bytes_ = 0;
  std::thread thread_;  // last: started when everything else is ready
};

}  // namespace lazyfs
