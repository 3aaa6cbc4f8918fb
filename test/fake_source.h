// FakeSource: a Source with files made of a known pattern, that counts what it
// is asked, can hold reads at a gate until the test opens it, and can fail on
// command. For engine tests that must see exactly which requests were made.
#pragma once

#include <sys/stat.h>

#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lazyfs/source.h"

namespace lazyfs::test {

// The byte at `offset` of every fake file; never constant over a block.
inline std::byte pattern_byte(uint64_t offset) {
  return static_cast<std::byte>((offset * 2654435761u) >> 13);
}

class FakeSource : public Source {
 public:
  struct Call {
    std::string path;
    uint64_t offset;
    uint64_t length;
    std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
  };

  explicit FakeSource(unsigned concurrency = 4, size_t chunk = 16 << 10)
      : concurrency_(concurrency), chunk_(chunk) {}

  void add(const std::string& path, uint64_t size, uint32_t mode = S_IFREG | 0644) {
    std::lock_guard lock(mutex_);
    files_[path] = {size, mode};
  }

  std::string describe() const override { return "fake://"; }
  unsigned max_concurrency() const override { return concurrency_; }

  Status stat(const std::string& path, SourceStat& out) override {
    std::unique_lock lock(mutex_);
    ++counters_.stats;
    stat_order_.push_back(path);
    events_.push_back("stat " + path);
    if (auto st = take_failure_locked(); !st.ok()) return st;
    auto it = files_.find(path);
    if (it == files_.end()) return Status::permanent(ENOENT, "no such fake file " + path);
    out.size = it->second.first;
    out.mode = it->second.second;
    out.mtime = mtimes_[path];
    return {};
  }

  Status read(const std::string& path, uint64_t offset, uint64_t length,
              const ChunkSink& sink) override {
    // Counts the reads in progress at once: until their last chunk goes to
    // the sink (after which the reader may already ask for more), or until
    // they end some other way.
    struct Active {
      FakeSource& s;
      uint64_t bytes;
      bool counted = true;
      Active(FakeSource& src, uint64_t length) : s(src), bytes(length) {
        const unsigned now = ++s.active_;
        unsigned seen = s.max_active_.load();
        while (now > seen && !s.max_active_.compare_exchange_weak(seen, now)) {
        }
        const uint64_t now_bytes = s.active_bytes_ += bytes;
        uint64_t seen_bytes = s.max_active_bytes_.load();
        while (now_bytes > seen_bytes &&
               !s.max_active_bytes_.compare_exchange_weak(seen_bytes, now_bytes)) {
        }
      }
      void end() {
        if (counted) {
          --s.active_;
          s.active_bytes_ -= bytes;
        }
        counted = false;
      }
      ~Active() { end(); }
      Active(const Active&) = delete;
      Active& operator=(const Active&) = delete;
    } active(*this, length);
    std::unique_lock lock(mutex_);
    calls_.push_back({path, offset, length});
    events_.push_back(fmt::format("read {}@{}", path, offset));
    ++counters_.reads;
    cv_.notify_all();
    cv_.wait(lock, [&] { return gate_open_; });
    if (auto st = take_failure_locked(); !st.ok()) return st;
    auto it = files_.find(path);
    if (it == files_.end()) return Status::permanent(ENOENT, "no such fake file " + path);
    const uint64_t size = it->second.first;
    lock.unlock();
    std::vector<std::byte> buf(chunk_);
    uint64_t end = std::min(size, offset + length);
    for (uint64_t at = offset; at < end;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(chunk_, end - at));
      for (size_t i = 0; i < n; ++i) buf[i] = pattern_byte(at + i);
      counters_.bytes_read += n;
      if (chunk_delay_.count() > 0) {
        // A shared link carries one chunk at a time.
        std::unique_lock link(link_mutex_, std::defer_lock);
        if (shared_link_) link.lock();
        std::this_thread::sleep_for(chunk_delay_);
      }
      if (at + n >= end) active.end();
      sink(at, std::span<const std::byte>(buf.data(), n));
      at += n;
      lock.lock();
      ++chunks_delivered_;
      cv_.notify_all();
      cv_.wait(lock, [&] { return chunks_delivered_ < pause_after_chunks_ || at >= end; });
      lock.unlock();
    }
    return {};
  }

  // Records how many ranges each call carried, then reads them one by one
  // (after the call's round trip, if set: a pipelined batch pays one).
  void read_many(std::span<const ReadRange> ranges, const ReadDone& done) override {
    {
      std::lock_guard lock(mutex_);
      batches_.push_back(ranges.size());
    }
    if (call_delay_.count() > 0) std::this_thread::sleep_for(call_delay_);
    Source::read_many(ranges, done);
  }
  // Paths stat'ed, in order.
  std::vector<std::string> stat_order() const {
    std::lock_guard lock(mutex_);
    return stat_order_;
  }
  // Stats ("stat PATH") and reads ("read PATH@OFFSET") as they started.
  std::vector<std::string> events() const {
    std::lock_guard lock(mutex_);
    return events_;
  }
  std::vector<size_t> batches() const {
    std::lock_guard lock(mutex_);
    return batches_;
  }

  // Reads wait at the gate while it is closed.
  void close_gate() {
    std::lock_guard lock(mutex_);
    gate_open_ = false;
  }
  void open_gate() {
    std::lock_guard lock(mutex_);
    gate_open_ = true;
    cv_.notify_all();
  }
  // Reads stop (before their last chunk) once `n` chunks were delivered in
  // all, until pause_after_chunks(SIZE_MAX) lets them go on.
  void pause_after_chunks(size_t n) {
    std::lock_guard lock(mutex_);
    pause_after_chunks_ = n;
    cv_.notify_all();
  }
  // The file's mtime from now on (0 until set): a change on the source.
  void set_mtime(const std::string& path, int64_t mtime) {
    std::lock_guard lock(mutex_);
    mtimes_[path] = mtime;
  }
  // Every chunk takes this long to arrive: a slow link. Set before reads start.
  void set_chunk_delay(std::chrono::microseconds delay) { chunk_delay_ = delay; }
  // With a chunk delay: one link that carries one chunk at a time, whoever
  // reads, instead of one per read. Set before reads start.
  void set_shared_link(bool shared) { shared_link_ = shared; }
  // Every read_many() call first waits this long: a round trip. Set before
  // reads start.
  void set_call_delay(std::chrono::microseconds delay) { call_delay_ = delay; }
  // The next `n` reads or stats fail with `status`.
  void fail_next(unsigned n, Status status) {
    std::lock_guard lock(mutex_);
    failures_left_ = n;
    failure_ = std::move(status);
  }
  void wait_for_calls(size_t n) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return calls_.size() >= n; });
  }
  void wait_for_chunks(size_t n) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return chunks_delivered_ >= n; });
  }
  // The most reads that were in progress at once since the last reset.
  unsigned max_active() const { return max_active_.load(); }
  // The most bytes those reads asked for, at once.
  uint64_t max_active_bytes() const { return max_active_bytes_.load(); }
  void reset_max_active() {
    max_active_ = active_.load();
    max_active_bytes_ = active_bytes_.load();
  }
  std::vector<Call> calls() const {
    std::lock_guard lock(mutex_);
    return calls_;
  }

 private:
  Status take_failure_locked() {
    if (failures_left_ == 0) return {};
    --failures_left_;
    return failure_;
  }

  unsigned concurrency_;
  size_t chunk_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, std::pair<uint64_t, uint32_t>> files_;
  std::map<std::string, int64_t> mtimes_;
  std::vector<Call> calls_;
  std::vector<size_t> batches_;  // ranges per read_many call
  std::vector<std::string> stat_order_;
  std::vector<std::string> events_;
  bool gate_open_ = true;
  size_t pause_after_chunks_ = SIZE_MAX;
  size_t chunks_delivered_ = 0;
  unsigned failures_left_ = 0;
  std::chrono::microseconds chunk_delay_{0};
  std::chrono::microseconds call_delay_{0};
  bool shared_link_ = false;
  std::mutex link_mutex_;
  std::atomic<unsigned> active_{0};
  std::atomic<unsigned> max_active_{0};
  std::atomic<uint64_t> active_bytes_{0};
  std::atomic<uint64_t> max_active_bytes_{0};
  Status failure_;
};

}  // namespace lazyfs::test
