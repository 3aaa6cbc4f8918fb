// The fetch engine against a counting fake source: fetch collapse, coalescing,
// early wake-up, priorities, errors, retries, staleness and restarts.
#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <thread>

#include "fake_source.h"
#include "lazyfs/engine.h"
#include "lazyfs/fileio.h"
#include "lazyfs/log.h"
#include "test_util.h"

using namespace lazyfs;
using namespace std::chrono_literals;
using lazyfs::test::FakeSource;
using lazyfs::test::pattern_byte;
using lazyfs::test::ScratchDir;

namespace {

constexpr uint64_t kBlock = 64 << 10;

// Collects completions; tests wait on it with a generous bound.
struct Completions {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<Status> results;
  std::vector<int> order;  // tags in completion order

  FetchEngine::Completion make(int tag = 0) {
    return [this, tag](const Status& st) {
      std::lock_guard lock(mutex);
      results.push_back(st);
      order.push_back(tag);
      cv.notify_all();
    };
  }
  bool wait(size_t n, std::chrono::milliseconds limit = 20s) {
    std::unique_lock lock(mutex);
    return cv.wait_for(lock, limit, [&] { return results.size() >= n; });
  }
  size_t ok_count() {
    std::lock_guard lock(mutex);
    return static_cast<size_t>(
        std::count_if(results.begin(), results.end(), [](const Status& s) { return s.ok(); }));
  }
  size_t count() {
    std::lock_guard lock(mutex);
    return results.size();
  }
};

struct Rig {
  ScratchDir dir{"engine"};
  std::shared_ptr<FakeSource> source;
  std::unique_ptr<BlockCache> cache;
  std::unique_ptr<FetchEngine> engine;
  FetchEngine::FileId file = 0;

  explicit Rig(EngineOptions opts = {}, unsigned concurrency = 4, uint64_t size = 64 * kBlock)
      : source(std::make_shared<FakeSource>(concurrency)) {
    source->add("/data/f", size);
    Status st;
    cache = BlockCache::open(dir.path() / "cache", "checkpoint-a", st);
    REQUIRE(st.ok());
    start(opts, size);
  }
  void start(EngineOptions opts, std::optional<uint64_t> size) {
    if (opts.block_size == EngineOptions{}.block_size) opts.block_size = kBlock;
    engine = std::make_unique<FetchEngine>(source, *cache, opts);
    file = engine->add_file("/data/f", size, S_IFREG | 0644);
  }
  // A new engine on the same cache directory, as after a daemon restart.
  void restart(EngineOptions opts, std::optional<uint64_t> size) {
    engine.reset();  // flushes the cache maps
    cache.reset();
    Status st;
    cache = BlockCache::open(dir.path() / "cache", "checkpoint-a", st);
    REQUIRE(st.ok());
    start(opts, size);
  }
  // Validates the file so later requests go straight to fetching.
  void validate() {
    Completions c;
    engine->file_info(file, [&](const Status& st, const FileInfo&) { c.make()(st); });
    REQUIRE(c.wait(1));
    REQUIRE(c.ok_count() == 1);
  }
  void check_bytes(uint64_t offset, uint64_t length) {
    std::vector<std::byte> buf(length);
    REQUIRE(pread_all(engine->cache_file(file)->fd()->get(), buf.data(), length, offset).value() ==
            0);
    for (uint64_t i = 0; i < length; ++i) {
      if (buf[i] != pattern_byte(offset + i)) FAIL("wrong byte at " << offset + i);
    }
  }
};

}  // namespace

TEST_CASE("64 concurrent readers of one block make one source request", "[engine]") {
  Rig rig;
  rig.validate();
  rig.source->close_gate();
  Completions c;
  std::vector<std::thread> readers;
  for (int i = 0; i < 64; ++i) {
    readers.emplace_back([&, i] {
      rig.engine->request(rig.file, 5 * kBlock + static_cast<uint64_t>(i) * 100, 4096,
                          Priority::kDemand, c.make());
    });
  }
  for (auto& t : readers) t.join();
  rig.source->wait_for_calls(1);
  rig.source->open_gate();
  REQUIRE(c.wait(64));
  CHECK(c.ok_count() == 64);
  // Only the first read was random: no read-ahead beyond the one block.
  auto calls = rig.source->calls();
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].offset == 5 * kBlock);
  CHECK(calls[0].length == kBlock);
  rig.check_bytes(5 * kBlock, kBlock);
}

TEST_CASE("adjacent missing blocks are coalesced up to the largest request", "[engine]") {
  EngineOptions opts;
  opts.max_request = 4 * kBlock;
  Rig rig(opts);
  rig.validate();
  Completions c;
  // Background: no read-ahead, which follows demand reads only.
  rig.engine->request(rig.file, 3 * kBlock, kBlock, Priority::kBackground, c.make());
  REQUIRE(c.wait(1));
  // Blocks 0..9 with block 3 present: [0,3) and [4,10) in chunks of 4 blocks.
  rig.engine->request(rig.file, 100, 10 * kBlock - 200, Priority::kDemand, c.make());
  REQUIRE(c.wait(2));
  CHECK(c.ok_count() == 2);
  auto calls = rig.source->calls();
  REQUIRE(calls.size() == 4);
  // The three requests run on different workers, in any order.
  std::sort(calls.begin() + 1, calls.end(),
            [](const auto& a, const auto& b) { return a.offset < b.offset; });
  CHECK(calls[1].offset == 0);
  CHECK(calls[1].length == 3 * kBlock);
  CHECK(calls[2].offset == 4 * kBlock);
  CHECK(calls[2].length == 4 * kBlock);
  CHECK(calls[3].offset == 8 * kBlock);
  CHECK(calls[3].length == 2 * kBlock);
  rig.check_bytes(0, 10 * kBlock);
}

TEST_CASE("a waiter wakes when its own blocks land, before the request ends", "[engine]") {
  Rig rig;
  rig.validate();
  rig.source->pause_after_chunks(4);  // block 0 is four 16 KiB chunks
  Completions first, last;
  rig.engine->request(rig.file, 0, 8 * kBlock, Priority::kBackground, last.make());
  rig.engine->request(rig.file, 0, 100, Priority::kDemand, first.make());
  // The read stops after block 0, with 7 blocks to go.
  rig.source->wait_for_chunks(4);
  REQUIRE(first.wait(1));
  CHECK(first.ok_count() == 1);
  CHECK(last.count() == 0);
  rig.source->pause_after_chunks(SIZE_MAX);
  REQUIRE(last.wait(1));
  CHECK(rig.source->calls().size() == 1);
}

TEST_CASE("demand goes before read-ahead before background", "[engine]") {
  EngineOptions opts;
  opts.threads = 1;
  Rig rig(opts, 1);
  rig.validate();
  rig.source->close_gate();
  Completions c;
  rig.engine->request(rig.file, 0, kBlock, Priority::kDemand, c.make(0));  // occupies the worker
  rig.source->wait_for_calls(1);
  rig.engine->request(rig.file, 40 * kBlock, kBlock, Priority::kBackground, c.make(3));
  rig.engine->request(rig.file, 30 * kBlock, kBlock, Priority::kReadAhead, c.make(2));
  rig.engine->request(rig.file, 20 * kBlock, kBlock, Priority::kDemand, c.make(1));
  // A queued background job raised by a demand read of its block.
  rig.engine->request(rig.file, 50 * kBlock, kBlock, Priority::kBackground, c.make(4));
  rig.engine->request(rig.file, 50 * kBlock, 10, Priority::kDemand, c.make(5));
  rig.source->open_gate();
  REQUIRE(c.wait(6));
  auto calls = rig.source->calls();
  REQUIRE(calls.size() == 5);
  CHECK(calls[1].offset == 20 * kBlock);
  CHECK(calls[2].offset == 50 * kBlock);
  CHECK(calls[3].offset == 30 * kBlock);
  CHECK(calls[4].offset == 40 * kBlock);
}

TEST_CASE("queued fetches of one priority go to the source together, never mixed", "[engine]") {
  EngineOptions opts;
  opts.threads = 1;
  Rig rig(opts, 1);
  rig.validate();
  rig.source->close_gate();
  Completions c;
  rig.engine->request(rig.file, 0, kBlock, Priority::kDemand, c.make());  // occupies the worker
  rig.source->wait_for_calls(1);
  for (uint64_t b = 10; b < 60; b += 5) {  // ten scattered blocks: no read-ahead
    rig.engine->request(rig.file, b * kBlock, 100, Priority::kDemand, c.make());
  }
  for (uint64_t b = 3; b < 6; ++b) {
    rig.engine->request(rig.file, b * kBlock, kBlock, Priority::kBackground, c.make());
  }
  rig.source->open_gate();
  REQUIRE(c.wait(14));
  CHECK(c.ok_count() == 14);
  // Three requests, three jobs (requests are coalesced only within one).
  CHECK(rig.source->batches() == std::vector<size_t>{1, 10, 3});
  for (uint64_t b = 10; b < 60; b += 5) rig.check_bytes(b * kBlock, kBlock);
  rig.check_bytes(3 * kBlock, 3 * kBlock);
}

TEST_CASE("background fetches leave one worker to readers", "[engine]") {
  EngineOptions opts;
  opts.threads = 2;
  opts.max_request = kBlock;  // every background block its own job
  Rig rig(opts, 2);
  rig.validate();
  rig.source->close_gate();
  Completions c;
  for (uint64_t b = 0; b < 8; ++b) {
    rig.engine->request(rig.file, b * kBlock, kBlock, Priority::kBackground, c.make());
  }
  rig.source->wait_for_calls(1);
  std::this_thread::sleep_for(100ms);
  CHECK(rig.source->calls().size() == 1);  // the second worker stays free
  rig.engine->request(rig.file, 40 * kBlock, 10, Priority::kDemand, c.make());
  rig.source->wait_for_calls(2);
  CHECK(rig.source->calls()[1].offset == 40 * kBlock);
  rig.source->open_gate();
  REQUIRE(c.wait(9));
  CHECK(c.ok_count() == 9);
  rig.check_bytes(0, 8 * kBlock);
}

TEST_CASE("an error fails every waiter of the failed blocks, a later request tries again",
          "[engine]") {
  Rig rig;
  rig.validate();
  rig.source->close_gate();
  Completions c, other;
  for (int i = 0; i < 8; ++i) rig.engine->request(rig.file, 0, 10, Priority::kDemand, c.make());
  rig.source->wait_for_calls(1);
  rig.source->fail_next(1, Status::permanent(EACCES, "injected permission error"));
  rig.source->open_gate();
  REQUIRE(c.wait(8));
  CHECK(c.ok_count() == 0);
  for (const auto& st : c.results) {
    CHECK(st.errnum() == EIO);
    CHECK_THAT(st.message(), Catch::Contains("injected permission error"));
  }
  rig.engine->request(rig.file, 0, 10, Priority::kDemand, other.make());
  REQUIRE(other.wait(1));
  CHECK(other.ok_count() == 1);
  CHECK(rig.engine->stats().errors == 1);
}

TEST_CASE("transient errors are retried with back-off", "[engine]") {
  EngineOptions opts;
  opts.retry_initial = 10ms;
  Rig rig(opts);
  rig.validate();
  rig.source->fail_next(3, Status::transient(ECONNRESET, "injected reset"));
  Completions c;
  rig.engine->request(rig.file, 0, 10, Priority::kDemand, c.make());
  REQUIRE(c.wait(1));
  CHECK(c.ok_count() == 1);
  CHECK(rig.engine->stats().retries == 3);
}

TEST_CASE("a spent retry budget gives EIO, never a hang", "[engine]") {
  EngineOptions opts;
  opts.retry_initial = 10ms;
  opts.retry_budget = 300ms;
  Rig rig(opts);
  rig.validate();
  rig.source->fail_next(1000000, Status::transient(ETIMEDOUT, "injected stall"));
  Completions c;
  rig.engine->request(rig.file, 0, 10, Priority::kDemand, c.make());
  REQUIRE(c.wait(1, 10s));
  CHECK(c.results[0].errnum() == EIO);
  CHECK_THAT(c.results[0].message(), Catch::Contains("injected stall"));
  CHECK(rig.engine->stats().retries > 0);
}

TEST_CASE("a file whose size or type changed on the source is stale", "[engine]") {
  Rig rig;
  rig.source->add("/data/f", 64 * kBlock + 1);
  Completions c;
  rig.engine->request(rig.file, 0, 10, Priority::kDemand, c.make());
  rig.engine->request(rig.file, kBlock, 10, Priority::kDemand, c.make());
  REQUIRE(c.wait(2));
  for (const auto& st : c.results) {
    CHECK(st.errnum() == EIO);
    CHECK_THAT(st.message(), Catch::Contains("stale") && Catch::Contains("size 4194305"));
  }
  CHECK(rig.source->calls().empty());  // no byte of the other version read

  auto dir_file = rig.engine->add_file("/data/d", std::nullopt, S_IFREG | 0644);
  rig.source->add("/data/d", 0, S_IFDIR | 0755);
  Completions d;
  rig.engine->request(dir_file, 0, 10, Priority::kDemand, d.make());
  REQUIRE(d.wait(1));
  CHECK_THAT(d.results[0].message(), Catch::Contains("type"));
}

TEST_CASE("a file recorded without a size takes the source's", "[engine]") {
  Rig rig;
  rig.source->add("/logs/app.log", 1000);
  auto id = rig.engine->add_file("/logs/app.log", std::nullopt, S_IFREG | 0644);
  Completions c;
  FileInfo info;
  rig.engine->file_info(id, [&](const Status& st, const FileInfo& i) {
    info = i;
    c.make()(st);
  });
  REQUIRE(c.wait(1));
  CHECK(info.size == 1000);
  rig.engine->request(id, 900, 1000, Priority::kDemand, c.make());
  REQUIRE(c.wait(2));
  CHECK(c.ok_count() == 2);
  CHECK(rig.source->calls().at(0).length == 1000);
}

TEST_CASE("sequential reads grow a read-ahead window, random reads do not", "[engine]") {
  Rig rig;
  rig.validate();
  Completions c;
  for (uint64_t i = 0; i < 8; ++i) {
    rig.engine->request(rig.file, i * kBlock, kBlock, Priority::kDemand, c.make());
    REQUIRE(c.wait(i + 1));
  }
  // Read-ahead lands asynchronously; let the engine drain.
  for (int i = 0; i < 200 && rig.engine->stats().inflight > 0; ++i)
    std::this_thread::sleep_for(10ms);
  // The window grows with the run (8 blocks read): read-ahead, but not
  // more than the run's length past it.
  CHECK(rig.engine->stats().fetched_bytes > 10 * kBlock);
  CHECK(rig.engine->stats().fetched_bytes <= 16 * kBlock);

  Rig rnd;
  rnd.validate();
  Completions r;
  for (uint64_t i = 0; i < 8; ++i) {
    rnd.engine->request(rnd.file, ((i * 37) % 64) * kBlock, 10, Priority::kDemand, r.make());
    REQUIRE(r.wait(i + 1));
  }
  CHECK(rnd.engine->stats().fetched_bytes == 8 * kBlock);
}

TEST_CASE("a restart on the same cache dir fetches nothing already present", "[engine]") {
  // Blocks 7 and 8 look like a sequential run: no read-ahead, which would
  // fetch block 9 at its own pace, after the counts are taken.
  EngineOptions no_readahead;
  no_readahead.readahead_max = 0;
  Rig rig(no_readahead);
  rig.validate();
  Completions c;
  for (uint64_t b : std::initializer_list<uint64_t>{1, 7, 8, 30, 63}) {
    rig.engine->request(rig.file, b * kBlock + 5, 100, Priority::kDemand, c.make());
  }
  REQUIRE(c.wait(5));
  const auto before = rig.source->calls().size();
  rig.restart(no_readahead, 64 * kBlock);
  Completions again;
  for (uint64_t b : std::initializer_list<uint64_t>{1, 7, 8, 30, 63}) {
    rig.engine->request(rig.file, b * kBlock, kBlock, Priority::kDemand, again.make());
  }
  REQUIRE(again.wait(5));
  CHECK(again.ok_count() == 5);
  CHECK(rig.source->calls().size() == before);  // no new reads
  rig.check_bytes(7 * kBlock, 2 * kBlock);
  // What the restart found, also as the totals without paths give it.
  const auto stats = rig.engine->file_stats();
  const auto totals = rig.engine->file_stats(/*with_paths=*/false);
  REQUIRE(stats.size() == totals.size());
  for (size_t i = 0; i < stats.size(); ++i) {
    CHECK(totals[i].path.empty());
    CHECK(totals[i].size == stats[i].size);
    CHECK(totals[i].present_bytes == stats[i].present_bytes);
    CHECK(totals[i].local_bytes == stats[i].local_bytes);
    CHECK(totals[i].durable == stats[i].durable);
  }
  const auto f = rig.engine->file_stat(rig.file);
  CHECK(f.present_bytes == 5 * kBlock);
  CHECK(f.size == 64 * kBlock);
}

TEST_CASE(
    "after a restart a file the cache holds whole needs no source, and one changed on the "
    "source since part of it was cached is fetched again",
    "[engine]") {
  EngineOptions no_readahead;
  no_readahead.readahead_max = 0;
  Rig rig(no_readahead);
  rig.source->add("/data/g", 4 * kBlock);
  auto g = rig.engine->add_file("/data/g", 4 * kBlock, S_IFREG | 0644);
  Completions c;
  rig.engine->request(rig.file, 0, 64 * kBlock, Priority::kDemand, c.make());
  rig.engine->request(g, 0, kBlock, Priority::kDemand, c.make());
  REQUIRE(c.wait(2));
  REQUIRE(c.ok_count() == 2);
  rig.restart(no_readahead, 64 * kBlock);
  g = rig.engine->add_file("/data/g", 4 * kBlock, S_IFREG | 0644);
  const auto reads = rig.source->calls().size();

  // The source is gone: the whole file is served all the same, without a
  // stat or a read.
  const auto events = rig.source->events().size();
  rig.source->fail_next(1000, Status::permanent(EHOSTUNREACH, "source is gone"));
  Completions whole;
  FileInfo info;
  rig.engine->file_info(rig.file, [&](const Status& s, const FileInfo& i) {
    info = i;
    whole.make()(s);
  });
  rig.engine->request(rig.file, 0, 64 * kBlock, Priority::kDemand, whole.make());
  REQUIRE(whole.wait(2));
  CHECK(whole.ok_count() == 2);
  CHECK(info.size == 64 * kBlock);
  CHECK(S_ISREG(info.source.mode));
  CHECK(rig.source->events().size() == events);
  rig.check_bytes(0, 64 * kBlock);

  // Back, with /data/g rewritten in place since its first block was cached:
  // that block is fetched again rather than served beside newer ones.
  rig.source->fail_next(0, {});
  rig.source->set_mtime("/data/g", 1000);
  Completions part;
  rig.engine->request(g, 0, kBlock, Priority::kDemand, part.make());
  REQUIRE(part.wait(1));
  CHECK(part.ok_count() == 1);
  CHECK(rig.source->calls().size() == reads + 1);
}

TEST_CASE("a file changed on the source during the mount goes stale at its next fetch",
          "[engine]") {
  ScratchDir dir("engine");
  const auto root = dir.path() / "src";
  std::filesystem::create_directories(root);
  std::vector<uint8_t> bytes(4 * kBlock);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(pattern_byte(i));
  lazyfs::test::write_bytes(root / "f", bytes);
  Status st;
  std::shared_ptr<Source> source = make_local_source(root.string(), st);
  REQUIRE(source);
  auto cache = BlockCache::open(dir.path() / "cache", "checkpoint-a", st);
  REQUIRE(cache);
  EngineOptions opts;
  opts.block_size = kBlock;
  opts.readahead_max = 0;
  FetchEngine engine(source, *cache, opts);
  const auto id = engine.add_file("/f", 4 * kBlock, S_IFREG | 0644);
  Completions c;
  engine.request(id, 0, kBlock, Priority::kDemand, c.make());
  REQUIRE(c.wait(1));
  REQUIRE(c.ok_count() == 1);

  // Rewritten in place: the same size, a later mtime.
  struct stat now {};
  REQUIRE(::stat((root / "f").c_str(), &now) == 0);
  const timespec times[2] = {{0, UTIME_OMIT}, {now.st_mtime + 60, 0}};
  REQUIRE(::utimensat(AT_FDCWD, (root / "f").c_str(), times, 0) == 0);
  engine.request(id, 2 * kBlock, kBlock, Priority::kDemand, c.make());
  REQUIRE(c.wait(2));
  CHECK(c.results[1].errnum() == EIO);
  CHECK_THAT(c.results[1].message(), Catch::Contains("changed on the source"));
  // Its cached bytes are not served either: they are of the old version.
  engine.request(id, 0, 10, Priority::kDemand, c.make());
  REQUIRE(c.wait(3));
  CHECK(c.results[2].errnum() == EIO);
  CHECK(engine.file_stat(id).stale);
}

TEST_CASE("bytes written locally survive a fetch that lands later", "[engine]") {
  Rig rig;
  rig.validate();
  rig.source->close_gate();
  Completions c;
  rig.engine->request(rig.file, 0, kBlock, Priority::kDemand, c.make());
  rig.source->wait_for_calls(1);
  const std::string local = "written by the restored process";
  REQUIRE(rig.engine->cache_file(rig.file)
              ->write_local(100, std::as_bytes(std::span(local.data(), local.size())))
              .ok());
  rig.source->open_gate();
  REQUIRE(c.wait(1));
  std::string got(local.size(), '\0');
  REQUIRE(pread_all(rig.engine->cache_file(rig.file)->fd()->get(), got.data(), got.size(), 100)
              .value() == 0);
  CHECK(got == local);
  rig.check_bytes(0, 100);
}

TEST_CASE("shutting down fails queued requests instead of hanging", "[engine]") {
  EngineOptions opts;
  opts.threads = 1;
  Rig rig(opts, 1);
  rig.validate();
  rig.source->close_gate();
  Completions c;
  rig.engine->request(rig.file, 0, 10, Priority::kDemand, c.make());
  rig.source->wait_for_calls(1);  // the one worker is busy: the others queue
  for (uint64_t i = 1; i < 10; ++i) {
    rig.engine->request(rig.file, i * 3 * kBlock, 10, Priority::kDemand, c.make());
  }
  std::thread opener([&] {
    std::this_thread::sleep_for(50ms);
    rig.source->open_gate();
  });
  rig.engine.reset();
  opener.join();
  REQUIRE(c.count() == 10);
  CHECK(c.ok_count() == 1);
  for (const auto& st : c.results) {
    if (!st.ok()) CHECK(st.errnum() == ECANCELED);
  }
}

TEST_CASE("stress: every request completes under concurrent mixed load with failures",
          "[engine][stress]") {
  EngineOptions opts;
  opts.retry_initial = 1ms;
  opts.retry_max = 5ms;
  opts.retry_budget = 2s;
  opts.max_request = 4 * kBlock;
  opts.readahead_max = 8 * kBlock;
  opts.flush_interval = 5ms;
  Rig rig(opts, 3, 512 * kBlock);
  Completions c;
  std::atomic<size_t> issued{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) * 7919);
      uint64_t seq = rng() % (512 * kBlock);
      for (int i = 0; i < 400; ++i) {
        uint64_t off, len;
        if (rng() % 2) {  // a sequential reader
          off = seq;
          len = 1 + rng() % (2 * kBlock);
          seq = (seq + len) % (512 * kBlock);
        } else {
          off = rng() % (512 * kBlock);
          len = 1 + rng() % (8 * kBlock);
        }
        auto prio = static_cast<Priority>(rng() % 3);
        if (rng() % 50 == 0) {
          rig.source->fail_next(1 + static_cast<unsigned>(rng() % 3),
                                Status::transient(ECONNRESET, "injected"));
        }
        ++issued;
        rig.engine->request(rig.file, off, len, prio, c.make());
      }
    });
  }
  for (auto& t : threads) t.join();
  REQUIRE(c.wait(issued, 60s));
  CHECK(c.ok_count() == issued);
  for (int i = 0; i < 500 && rig.engine->stats().inflight > 0; ++i)
    std::this_thread::sleep_for(10ms);
  CHECK(rig.engine->stats().inflight == 0);
}

namespace {

EngineOptions one_worker() {
  EngineOptions opts;
  opts.threads = 1;  // one job at a time, in queue order
  return opts;
}

// Adds /many/0 .. /many/(n - 1), 10 bytes each, not validated yet.
std::vector<FetchEngine::FileId> add_many(Rig& rig, int n) {
  std::vector<FetchEngine::FileId> ids;
  for (int i = 0; i < n; ++i) {
    const auto path = "/many/" + std::to_string(i);
    rig.source->add(path, 10);
    ids.push_back(rig.engine->add_file(path, 10, S_IFREG | 0644));
  }
  return ids;
}

// One worker, held by a read of the validated /data/f at the source's gate,
// so that whatever is queued next waits; `held` completes once the gate opens.
struct HeldRig {
  Rig rig{one_worker(), 1};
  Completions held;
  HeldRig() {
    rig.validate();
    rig.source->close_gate();
    rig.engine->request(rig.file, 0, kBlock, Priority::kDemand, held.make());
    rig.source->wait_for_calls(1);
  }
};

}  // namespace

TEST_CASE("validate_all validates the files it is given first", "[engine]") {
  Rig rig(one_worker(), 1);
  const auto ids = add_many(rig, 600);
  rig.engine->validate_all({ids[599], ids[300]});
  Completions c;
  for (auto id : ids) {
    rig.engine->file_info(id, [&](const Status& st, const FileInfo&) { c.make()(st); });
  }
  REQUIRE(c.wait(ids.size()));
  CHECK(c.ok_count() == ids.size());
  const auto order = rig.source->stat_order();
  REQUIRE(order.size() == 601);  // and /data/f
  CHECK(order[0] == "/many/599");
  CHECK(order[1] == "/many/300");
}

TEST_CASE(
    "with a trace, validations wait behind readers' fetches, and a reader waiting for "
    "one moves its batch ahead",
    "[engine]") {
  HeldRig h;
  Rig& rig = h.rig;
  const auto ids = add_many(rig, 600);
  // A trace's file first; the rest in three batches at prefetch priority:
  // /many/0-198, 199-399 (without 300), 400-599.
  rig.engine->validate_all({ids[300]});
  Completions c;
  rig.engine->request(rig.file, 8 * kBlock, kBlock, Priority::kDemand, c.make());
  auto info = c.make();
  rig.engine->file_info(ids[599], [&](const Status& st, const FileInfo&) { info(st); });
  rig.source->open_gate();
  REQUIRE(h.held.wait(1));
  REQUIRE(c.wait(2));
  CHECK(c.ok_count() == 2);
  Completions all;
  for (auto id : ids) {
    rig.engine->file_info(id, [&](const Status& st, const FileInfo&) { all.make()(st); });
  }
  REQUIRE(all.wait(ids.size()));
  const auto events = rig.source->events();
  REQUIRE(events.size() == 1 + 2 + 600);  // rig.validate()'s stat, two reads, 600 stats
  CHECK(events[1] == "read /data/f@0");
  CHECK(events[2] == "stat /many/300");                            // the trace's batch
  CHECK(events[3] == fmt::format("read /data/f@{}", 8 * kBlock));  // ahead of the rest
  CHECK(events[4] == "stat /many/400");  // the batch a reader waits for, ahead of the others
  CHECK(events[204] == "stat /many/0");
  CHECK(events[403] == "stat /many/199");
}

TEST_CASE(
    "without a trace too, validations wait behind readers' fetches, and a reader waiting "
    "for one moves its batch ahead",
    "[engine]") {
  HeldRig h;
  Rig& rig = h.rig;
  const auto ids = add_many(rig, 600);
  // Three batches: /many/0-199, 200-399, 400-599.
  rig.engine->validate_all();
  Completions c;
  rig.engine->request(rig.file, 8 * kBlock, kBlock, Priority::kDemand, c.make());
  auto info = c.make();
  rig.engine->file_info(ids[599], [&](const Status& st, const FileInfo&) { info(st); });
  rig.source->open_gate();
  REQUIRE(h.held.wait(1));
  REQUIRE(c.wait(2));
  CHECK(c.ok_count() == 2);
  Completions all;
  for (auto id : ids) {
    rig.engine->file_info(id, [&](const Status& st, const FileInfo&) { all.make()(st); });
  }
  REQUIRE(all.wait(ids.size()));
  const auto events = rig.source->events();
  REQUIRE(events.size() == 1 + 2 + 600);  // rig.validate()'s stat, two reads, 600 stats
  CHECK(events[1] == "read /data/f@0");
  CHECK(events[2] == fmt::format("read /data/f@{}", 8 * kBlock));  // ahead of every batch
  CHECK(events[3] == "stat /many/400");  // the batch a reader waits for, ahead of the others
  CHECK(events[203] == "stat /many/0");
  CHECK(events[403] == "stat /many/200");
}

TEST_CASE(
    "stopping with validations queued fails their waiters as cancelled, logs no file as "
    "unservable",
    "[engine]") {
  std::mutex mutex;
  std::vector<std::string> errors;
  log::set_sink([&](log::Level level, std::string_view, std::string_view message) {
    std::lock_guard lock(mutex);
    if (level == log::Level::kError) errors.emplace_back(message);
  });
  // The engine stops with the validations still queued.
  HeldRig h;
  Rig& rig = h.rig;
  const auto ids = add_many(rig, 300);
  rig.engine->validate_all();
  Completions c;
  rig.engine->request(ids[0], 0, 10, Priority::kDemand, c.make());
  std::thread opener([&] {
    std::this_thread::sleep_for(100ms);
    rig.source->open_gate();
  });
  rig.engine.reset();
  opener.join();
  log::set_sink({});
  REQUIRE(c.wait(1));
  CHECK(c.results[0].errnum() == ECANCELED);
  CHECK(rig.source->stat_order().size() == 1);  // only rig.validate()'s
  std::lock_guard lock(mutex);
  CHECK(errors.empty());
}

TEST_CASE("validate_all validates every file in one batch, a missing file is unservable",
          "[engine]") {
  Rig rig;
  rig.source->add("/data/g", 10);
  auto g = rig.engine->add_file("/data/g", 10, S_IFREG | 0644);
  auto gone = rig.engine->add_file("/data/gone", 10, S_IFREG | 0644);
  rig.engine->validate_all();
  Completions c;
  for (auto id : {rig.file, g, gone}) {
    rig.engine->file_info(id, [&](const Status& st, const FileInfo&) { c.make()(st); });
  }
  REQUIRE(c.wait(3));
  CHECK(c.ok_count() == 2);
  CHECK(rig.source->counters().stats == 3);  // one each, none repeated
  Completions r;
  rig.engine->request(gone, 0, 10, Priority::kDemand, r.make());
  REQUIRE(r.wait(1));
  CHECK(r.results[0].errnum() == EIO);
  CHECK_THAT(r.results[0].message(), Catch::Contains("no such fake file"));
}
