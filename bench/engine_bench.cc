// lazyfs-engine-bench: the fetch engine alone (no FUSE) against an SFTP,
// HTTP(S) or file:// source. Measures a cold sequential fetch of a whole file, the same
// file read sequentially in 1 MiB requests (as the kernel asks through FUSE),
// and random 4 KiB reads (source requests and bytes against blocks touched),
// for one or more block sizes. bench/engine-bench.sh runs it against a
// throwaway sshd beside `curl`; see docs/benchmarks.md.
#include <sys/stat.h>

#include <fmt/core.h>
#include <CLI/CLI.hpp>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "lazyfs/cache.h"
#include "lazyfs/engine.h"
#include "lazyfs/http_source.h"
#include "lazyfs/log.h"
#include "lazyfs/sftp_source.h"
#include "lazyfs/source.h"

using namespace lazyfs;
using Clock = std::chrono::steady_clock;

namespace {

struct Args {
  std::string source;  // sftp://..., http(s)://... or file:///DIR
  std::string path;    // the file, as an image path (read at ROOT + path)
  std::string identity;
  std::string known_hosts;
  std::string cache_dir = "/var/tmp/lazyfs-engine-bench";
  std::vector<std::string> block_sizes{"128K"};
  unsigned connections = 4;
  unsigned random_reads = 1000;
  unsigned concurrency = 8;
  double curl_seconds = 0;  // a plain download of the same file, for the ratio
};

uint64_t parse_size(const std::string& s) {
  uint64_t v = std::stoull(s);
  if (s.back() == 'K') return v << 10;
  if (s.back() == 'M') return v << 20;
  return v;
}

class Waiter {
 public:
  FetchEngine::Completion make() {
    {
      std::lock_guard lock(mutex_);
      ++expected_;
    }
    return [this](const Status& st) {
      std::lock_guard lock(mutex_);
      ++done_;
      if (!st.ok()) error_ = st.message();
      cv_.notify_all();
    };
  }
  void wait_all() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return done_ >= expected_; });
    if (!error_.empty()) throw std::runtime_error(error_);
  }
  // Blocks until at most `n` requests are outstanding.
  void wait_below(size_t n) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return expected_ - done_ < n; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  size_t expected_ = 0;
  size_t done_ = 0;
  std::string error_;
};

std::shared_ptr<Source> open_source(const Args& a) {
  Status st;
  std::unique_ptr<Source> s;
  if (a.source.rfind("file://", 0) == 0) {
    s = make_local_source(a.source.substr(7), st);
  } else if (a.source.rfind("http://", 0) == 0 || a.source.rfind("https://", 0) == 0) {
    HttpOptions o;
    o.base_url = a.source;
    o.connections = a.connections;
    s = make_http_source(o, st);
  } else {
    SftpOptions o;
    std::string err;
    if (!parse_sftp_uri(a.source, o, err)) throw std::runtime_error(err);
    o.connections = a.connections;
    if (!a.identity.empty()) o.identity_files = {a.identity};
    o.known_hosts = a.known_hosts;
    s = make_sftp_source(o, st);
  }
  if (!s) throw std::runtime_error(st.message());
  return std::shared_ptr<Source>(std::move(s));
}

struct Run {
  std::shared_ptr<Source> source;  // the engine's stop cancels it: one per run
  std::unique_ptr<BlockCache> cache;
  std::unique_ptr<FetchEngine> engine;
  FetchEngine::FileId id = 0;
  uint64_t size = 0;
};

uint64_t total_connects = 0;

// A cold engine over a fresh cache directory, on a new source whose
// connections are all up before the clock starts.
Run cold(const Args& a, uint64_t block, const std::string& tag) {
  const auto dir = std::filesystem::path(a.cache_dir) / tag;
  std::filesystem::remove_all(dir);
  Run r;
  r.source = open_source(a);
  auto& source = r.source;
  source->warm_up_async();
  if (a.source.rfind("file://", 0) != 0) {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    const auto& c = source->counters();
    while (c.connects.load() + c.connect_failures.load() < a.connections &&
           Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  Status st;
  r.cache = BlockCache::open(dir, "engine-bench", st);
  if (!r.cache) throw std::runtime_error(st.message());
  EngineOptions eo;
  eo.block_size = block;
  eo.max_request = std::max<uint64_t>(eo.max_request, block);
  r.engine = std::make_unique<FetchEngine>(source, *r.cache, eo);
  SourceStat sst;
  if (auto s = source->stat(a.path, sst); !s.ok()) throw std::runtime_error(s.message());
  r.size = sst.size;
  r.id = r.engine->add_file(a.path, sst.size, sst.mode);
  return r;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

nlohmann::json bench_block_size(const Args& a, uint64_t block) {
  nlohmann::json out{{"block_size", block}};
  {
    Run r = cold(a, block, "whole");
    Waiter w;
    auto t0 = Clock::now();
    r.engine->request(r.id, 0, r.size, Priority::kDemand, w.make());
    w.wait_all();
    const double s = seconds_since(t0);
    out["whole_file_s"] = s;
    out["whole_file_mb_s"] = static_cast<double>(r.size) / s / 1e6;
    out["whole_file_requests"] = r.engine->stats().fetch_requests;
    total_connects += r.source->counters().connects.load();
  }
  {
    // The kernel reads a FUSE file in 1 MiB requests, a few at a time.
    Run r = cold(a, block, "seq");
    Waiter w;
    auto t0 = Clock::now();
    for (uint64_t off = 0; off < r.size; off += 1 << 20) {
      w.wait_below(4);
      r.engine->request(r.id, off, 1 << 20, Priority::kDemand, w.make());
    }
    w.wait_all();
    const double s = seconds_since(t0);
    out["sequential_1m_s"] = s;
    out["sequential_1m_mb_s"] = static_cast<double>(r.size) / s / 1e6;
    total_connects += r.source->counters().connects.load();
  }
  {
    Run r = cold(a, block, "random");
    std::mt19937_64 rng(1);
    std::set<uint64_t> blocks;
    Waiter w;
    auto t0 = Clock::now();
    for (unsigned i = 0; i < a.random_reads; ++i) {
      const uint64_t off = (rng() % (r.size / 4096)) * 4096;
      blocks.insert(off / block);
      w.wait_below(a.concurrency);
      r.engine->request(r.id, off, 4096, Priority::kDemand, w.make());
    }
    w.wait_all();
    const double s = seconds_since(t0);
    const auto st = r.engine->stats();
    out["random_reads"] = a.random_reads;
    total_connects += r.source->counters().connects.load();
    out["random_s"] = s;
    out["random_mean_latency_ms"] = st.latency_sum_s * 1000 / static_cast<double>(st.latency_count);
    out["random_blocks_touched"] = blocks.size();
    out["random_source_requests"] = st.fetch_requests;
    out["random_fetched_bytes"] = st.fetched_bytes;
    out["random_bytes_per_touched_block"] =
        static_cast<double>(st.fetched_bytes) / static_cast<double>(blocks.size() * block);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"lazyfs-engine-bench: the fetch engine against a source, without FUSE"};
  app.add_option("--source", a.source,
                 "sftp://USER@HOST:PORT/ROOT, http(s)://HOST:PORT/PREFIX or file:///DIR")
      ->required();
  app.add_option("--path", a.path, "File to read (image path; read at ROOT + path)")->required();
  app.add_option("--identity", a.identity, "SSH private key");
  app.add_option("--known-hosts", a.known_hosts, "known_hosts file");
  app.add_option("--cache-dir", a.cache_dir, "Scratch cache directory (emptied)");
  app.add_option("--block-size", a.block_sizes, "Block sizes to measure (repeatable)");
  app.add_option("--connections", a.connections, "Connections to the source");
  app.add_option("--random-reads", a.random_reads, "Random 4 KiB reads");
  app.add_option("--concurrency", a.concurrency, "Random reads in flight");
  app.add_option("--curl-seconds", a.curl_seconds,
                 "Seconds a single curl download of the file took, for the ratio");
  CLI11_PARSE(app, argc, argv);
  log::set_level(log::Level::kWarn);
  try {
    nlohmann::json results = nlohmann::json::array();
    for (const auto& bs : a.block_sizes) {
      results.push_back(bench_block_size(a, parse_size(bs)));
      fmt::print(stderr, "block {}: done\n", bs);
    }
    nlohmann::json doc{
        {"source", open_source(a)->describe()}, {"connects", total_connects}, {"results", results}};
    fmt::print("{}\n", doc.dump(2));
    for (const auto& r : results) {
      fmt::print(
          "block {:>7}: whole file {:.2f} s ({:.0f} MB/s){}; 1 MiB sequential {:.2f} s; "
          "random 4 KiB: {} source requests for {} blocks touched, {:.3f}x the bytes "
          "of the blocks touched, mean latency {:.1f} ms\n",
          r["block_size"].get<uint64_t>(), r["whole_file_s"].get<double>(),
          r["whole_file_mb_s"].get<double>(),
          a.curl_seconds > 0
              ? fmt::format(", {:.2f}x curl's {:.2f} s",
                            a.curl_seconds / r["whole_file_s"].get<double>(), a.curl_seconds)
              : "",
          r["sequential_1m_s"].get<double>(), r["random_source_requests"].get<uint64_t>(),
          r["random_blocks_touched"].get<size_t>(),
          r["random_bytes_per_touched_block"].get<double>(),
          r["random_mean_latency_ms"].get<double>());
    }
    std::filesystem::remove_all(a.cache_dir);
  } catch (const std::exception& e) {
    fmt::print(stderr, "lazyfs-engine-bench: {}\n", e.what());
    return 1;
  }
  return 0;
}
