// The fill and traces on real mounts: `status --wait`, a source that stops
// half way, a restart that resumes, and a recorded trace prefetched next time.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <iterator>
#include <thread>

#include "lazyfs/checkpoint_writer.h"
#include "lazyfs/trace.h"
#include "mount_fixture.h"
#include "sshd_fixture.h"
#include "test_util.h"

using namespace lazyfs;
using namespace lazyfs::test;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kBlock = 128 << 10;
const std::string kBig = "/srv/lazyfs-fixture-a/data/big.bin";

struct Rig {
  ScratchDir dir{"fillmount"};
  std::filesystem::path images = dir.path() / "images";
  std::filesystem::path source = dir.path() / "source";
  std::filesystem::path mnt = dir.path() / "mnt";
  std::filesystem::path cache = dir.path() / "cache";
  Catalog catalog;
  std::unique_ptr<LazyfsMount> mount;

  Rig() : catalog(load()) { populate_source(catalog, source); }
  Catalog load() {
    copy_fixture(images);
    return Catalog::load(images);
  }
  void start(const std::string& uri, std::vector<std::string> extra) {
    extra.insert(extra.begin(), {"--cache-dir", cache.string()});
    mount = std::make_unique<LazyfsMount>(mnt, images, uri, extra);
  }
  void start_file(std::vector<std::string> extra) {
    start("file://" + source.string(), std::move(extra));
  }
  std::string at(const std::string& p) const { return mount->at(p).string(); }
};

uint64_t present(const nlohmann::json& st) {
  return st["present_bytes"].get<uint64_t>();
}

}  // namespace

TEST_CASE("with --fill every file becomes local and status --wait returns 0", "[mount][fill]") {
  // --fill-alongside implies --fill.
  const std::string alongside = GENERATE("", "1M", "auto");
  INFO((alongside.empty() ? "--fill" : "--fill-alongside " + alongside));
  Rig rig;
  rig.start_file(!alongside.empty() ? std::vector<std::string>{"--fill-alongside", alongside}
                                    : std::vector<std::string>{"--fill"});
  auto r = run_lazyfs({"status", "--wait", rig.mnt.string()});
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("complete"));
  auto st = rig.mount->status();
  CHECK(st["complete"] == true);
  CHECK(st["fill"]["state"] == "complete");
  // Running beside missing readers: always with a size; with auto, only once
  // a trial found it faster (no reader here, so no trial).
  CHECK(st["fill"]["alongside"] == (alongside == "1M"));
  const auto fetched = st["fetched_bytes"].get<uint64_t>();
  CHECK(fetched == st["total_bytes"].get<uint64_t>());
  // Byte-identical, and reading them fetches nothing more.
  for (const auto& f : rig.catalog.files()) {
    CHECK(read_file(rig.at(f.path)) == file_bytes(f));
  }
  CHECK(rig.mount->status()["fetched_bytes"].get<uint64_t>() == fetched);
}

TEST_CASE("a fill stopped by its source makes status --wait fail with the reason",
          "[mount][fill][sftp]") {
  SshServer sshd;
  Rig rig;
  rig.start("sftp://root@127.0.0.1:" + std::to_string(sshd.port()) + rig.source.string(),
            {"--identity", sshd.user_key().string(), "--known-hosts", sshd.known_hosts().string(),
             "--fill-rate", "4M", "--timeout", "2"});
  REQUIRE(present(rig.mount->status()) < rig.catalog.total_bytes());
  std::this_thread::sleep_for(1s);
  sshd.stop();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = run_lazyfs({"status", "--wait", rig.mnt.string()});
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("fill stopped") && Catch::Contains("127.0.0.1"));
  CHECK(std::chrono::steady_clock::now() - t0 < 60s);
  CHECK(rig.mount->status()["fill"]["state"] == "failed");
}

TEST_CASE("after a restart the fill continues without fetching again", "[mount][fill]") {
  Rig rig;
  rig.start_file({"--fill-rate", "8M"});
  std::this_thread::sleep_for(1200ms);
  const uint64_t before = present(rig.mount->status());
  REQUIRE(rig.mount->stop());
  REQUIRE(before > 0);
  rig.start_file({"--fill"});
  REQUIRE(run_lazyfs({"status", "--wait", rig.mnt.string()}).status == 0);
  auto st = rig.mount->status();
  // What the first daemon fetched (and flushed at unmount) is not fetched again.
  CHECK(st["fetched_bytes"].get<uint64_t>() + before <= st["total_bytes"].get<uint64_t>() + kBlock);
  CHECK(read_file(rig.at(kBig)) == source_bytes(kBig, 0, 16 << 20));
}

TEST_CASE("once the fill is complete the source can go: a restart serves every file without it",
          "[mount][fill][sftp]") {
  SshServer sshd;
  Rig rig;
  const std::string uri =
      "sftp://root@127.0.0.1:" + std::to_string(sshd.port()) + rig.source.string();
  const auto with = [&](std::vector<std::string> extra) {
    for (const auto& o : {"--identity", sshd.user_key().c_str(), "--known-hosts",
                          sshd.known_hosts().c_str(), "--timeout", "2"}) {
      extra.emplace_back(o);
    }
    return extra;
  };
  SECTION("every file local") {
    rig.start(uri, with({"--fill"}));
    REQUIRE(run_lazyfs({"status", "--wait", rig.mnt.string()}).status == 0);
    REQUIRE(rig.mount->stop());
    sshd.stop();
    const auto log = rig.dir.path() / "offline.log";
    rig.start(uri, with({"--log-file", log.string()}));
    for (const auto& f : rig.catalog.files()) {
      CHECK(read_file(rig.at(f.path)) == file_bytes(f));
    }
    auto st = rig.mount->status();
    CHECK(st["complete"] == true);
    CHECK(st["fetched_bytes"] == 0);
    CHECK(st["source"]["state"] == "down");
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK_THAT(text, Catch::Contains("source unreachable") &&
                         Catch::Contains("every file is wholly in the cache"));
  }
  SECTION("one file short: the mount fails as before") {
    rig.start(uri, with({}));
    CHECK(read_file(rig.at(kBig)).size() == 16 << 20);
    REQUIRE(rig.mount->stop());
    sshd.stop();
    std::filesystem::create_directories(rig.mnt);
    auto r = run_lazyfs({"mount", "--cache-dir", rig.cache.string(), "--identity",
                         sshd.user_key().string(), "--known-hosts", sshd.known_hosts().string(),
                         rig.mnt.string(), rig.images.string(), uri});
    CHECK(r.status != 0);
    CHECK_THAT(r.err, Catch::Contains("127.0.0.1") && Catch::Contains("refused"));
    CHECK_FALSE(is_mounted(rig.mnt));
  }
}

TEST_CASE("a fill of more files than the daemon may have open completes", "[mount][fill]") {
  // 600 files, a daemon limited to 128 open files: the cache keeps at most
  // 32 data files open and reopens the others when it needs them.
  ScratchDir dir("manyfiles");
  std::vector<CheckpointFile> files;
  for (int i = 0; i < 600; ++i) {
    files.push_back({fmt::format("/srv/many/d{}/f{:03}.bin", i / 100, i),
                     static_cast<uint64_t>(1000 + 37 * i), S_IFREG | 0644, 0, 0});
  }
  write_checkpoint(dir.path() / "images", files, "run-many");
  const auto source = dir.path() / "source";
  for (const auto& f : files) {
    auto p = std::filesystem::path(source.string() + f.path);
    std::filesystem::create_directories(p.parent_path());
    write_bytes(p, source_bytes(f.path, 0, *f.size));
  }
  // The daemon raises its soft limit to the hard one: prlimit(1) lowers both.
  auto mount = std::make_unique<LazyfsMount>(
      dir.path() / "mnt", dir.path() / "images", "file://" + source.string(),
      std::vector<std::string>{"--cache-dir", (dir.path() / "cache").string(), "--fill"},
      std::vector<std::string>{"prlimit", "--nofile=128:128", "--"});
  auto r = run_lazyfs({"status", "--wait", mount->mountpoint().string()});
  INFO(r.err);
  REQUIRE(r.status == 0);
  for (const auto& f : files) {
    INFO(f.path);
    CHECK(read_file(mount->at(f.path)) == source_bytes(f.path, 0, *f.size));
  }
  CHECK(mount->status()["errors"] == 0);
}

TEST_CASE("a recorded trace is prefetched by the next mount: no demand misses", "[mount][trace]") {
  Rig rig;
  const auto trace = rig.dir.path() / "app.trace";
  rig.start_file({"--record-trace", trace.string()});
  std::vector<std::pair<std::string, uint64_t>> reads{
      {kBig, 0},
      {kBig, 3 * kBlock + 5},
      {kBig, 100 * kBlock},
      {"/srv/lazyfs-fixture-a/state/counter.db", 0}};
  auto read_all = [&] {
    for (const auto& [path, off] : reads) {
      int fd = ::open(rig.at(path).c_str(), O_RDONLY);
      REQUIRE(fd >= 0);
      ::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
      char buf[100];
      REQUIRE(::pread(fd, buf, sizeof buf, static_cast<off_t>(off)) == 100);
      ::close(fd);
    }
  };
  read_all();
  const auto misses_first = rig.mount->status()["demand_misses"].get<uint64_t>();
  CHECK(misses_first >= reads.size());
  REQUIRE(rig.mount->stop());  // writes the trace
  auto records = read_trace(trace);
  REQUIRE(records.size() == 4);
  CHECK(records[0].path == kBig);
  CHECK(records[0].offset == 0);

  // Next migration: a cold cache, the trace prefetched.
  std::filesystem::remove_all(rig.cache);
  // --prefetch-wait: the mount returns once the trace's blocks are local.
  rig.start_file({"--prefetch", trace.string(), "--prefetch-wait", "30"});
  auto at_start = rig.mount->status();
  CHECK(at_start["fetched_bytes"].get<uint64_t>() >= 3 * kBlock);
  read_all();
  auto st = rig.mount->status();
  CHECK(st["demand_misses"] == 0);
  CHECK(st["prefetch"]["records"] == 4);
}

TEST_CASE("prefetch: a malformed trace is refused with its line, unknown files are skipped",
          "[mount][trace]") {
  Rig rig;
  const auto trace = rig.dir.path() / "bad.trace";
  std::ofstream(trace) << "lazyfs-trace 1\n0 4096 /srv/lazyfs-fixture-a/data/big.bin\nbogus\n";
  std::filesystem::create_directories(rig.mnt);
  auto r = run_lazyfs({"mount", "--cache-dir", rig.cache.string(), "--prefetch", trace.string(),
                       rig.mnt.string(), rig.images.string(), "file://" + rig.source.string()});
  CHECK(r.status == 2);
  CHECK_THAT(r.err, Catch::Contains("bad.trace:3:"));
  std::ofstream(trace) << "lazyfs-trace 1\n0 4096 /not/in/the/checkpoint\n0 4096 " << kBig << "\n";
  rig.start_file({"--prefetch", trace.string()});
  auto st = rig.mount->status();
  CHECK(st["prefetch"]["skipped"] == 1);
  CHECK(st["prefetch"]["records"] == 1);
  REQUIRE(rig.mount->stop());
  r = run_lazyfs({"mount", "--cache-dir", rig.cache.string(), "--prefetch-wait", "5",
                  rig.mnt.string(), rig.images.string(), "file://" + rig.source.string()});
  CHECK(r.status == 2);
  CHECK_THAT(r.err, Catch::Contains("--prefetch-wait needs --prefetch"));
  r = run_lazyfs({"mount", "--cache-dir", rig.cache.string(), "--fill-alongside", "lots",
                  rig.mnt.string(), rig.images.string(), "file://" + rig.source.string()});
  CHECK(r.status == 2);
  CHECK_THAT(r.err,
             Catch::Contains("--fill-alongside lots: need a size in bytes, e.g. 4M, or auto"));
}
