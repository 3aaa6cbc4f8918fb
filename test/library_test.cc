// liblazyfs as an embedder uses it: two file systems in one process, each
// served on a background thread and stopped cleanly (also with a file still
// open), lazy reads without a mount, and logging through a callback.
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <mutex>

#include "fake_source.h"
#include "lazyfs/filesystem.h"
#include "lazyfs/lazyfs.h"
#include "mount_fixture.h"
#include "test_util.h"

using namespace lazyfs;
using namespace lazyfs::test;
using namespace std::chrono_literals;

namespace {

const std::string kBig = "/srv/lazyfs-fixture-a/data/big.bin";

struct LibRig {
  ScratchDir dir{"lib"};
  Catalog catalog;
  std::shared_ptr<Source> source;
  LibRig() : catalog(load()) {
    populate_source(catalog, dir.path() / "source");
    Status st;
    source = open_source("file://" + (dir.path() / "source").string(), {}, st);
    REQUIRE(st.ok());
  }
  Catalog load() {
    copy_fixture(dir.path() / "images");
    return Catalog::load(dir.path() / "images");
  }
  std::unique_ptr<Filesystem> mounted(const std::string& name, bool control_socket = false) {
    FilesystemOptions o;
    o.cache_dir = dir.path() / ("cache-" + name);
    o.control_socket = control_socket;
    Status st;
    auto fs = Filesystem::create(catalog, source, o, st);
    REQUIRE(fs);
    const auto mnt = dir.path() / ("mnt-" + name);
    std::filesystem::create_directories(mnt);
    REQUIRE(fs->mount(mnt).ok());
    REQUIRE(fs->start().ok());
    return fs;
  }
};

}  // namespace

TEST_CASE("library: two file systems in one process, started and stopped", "[library]") {
  LibRig rig;
  auto a = rig.mounted("a");
  auto b = rig.mounted("b");
  CHECK(read_file(a->mountpoint().string() + kBig) == source_bytes(kBig, 0, 16 << 20));
  CHECK(read_file(b->mountpoint().string() + kBig) == source_bytes(kBig, 0, 16 << 20));
  // One keeps a file open while it is stopped: the stop still ends.
  int fd = ::open((b->mountpoint().string() + kBig).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  a->stop();
  b->stop();
  ::close(fd);
  CHECK_FALSE(is_mounted(a->mountpoint()));
  CHECK_FALSE(is_mounted(b->mountpoint()));
  CHECK(nlohmann::json::parse(a->status_json())["fetched_bytes"] == 16u << 20);
}

TEST_CASE("library: query_status asks a mount over its status socket", "[library]") {
  LibRig rig;
  auto fs = rig.mounted("q", /*control_socket=*/true);
  {
    std::vector<uint8_t> got(1 << 20);
    int fd = ::open((fs->mountpoint().string() + kBig).c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    CHECK(::pread(fd, got.data(), got.size(), 0) == static_cast<ssize_t>(got.size()));
    ::close(fd);
    CHECK(got == source_bytes(kBig, 0, got.size()));
  }
  std::string doc;
  REQUIRE(query_status(fs->mountpoint(), doc, /*with_files=*/false).ok());
  auto j = nlohmann::json::parse(doc);
  CHECK(j["pid"] == ::getpid());
  CHECK(j["fetched_bytes"].get<uint64_t>() >= 1u << 20);
  CHECK(j["complete"] == false);
  CHECK_FALSE(j.contains("files"));
  REQUIRE(query_status(fs->mountpoint(), doc).ok());
  CHECK(nlohmann::json::parse(doc).contains("files"));
  fs->stop();
  const auto st = query_status(fs->mountpoint(), doc);
  CHECK_FALSE(st.ok());
  CHECK_THAT(st.message(), Catch::Contains("no lazyfs mount is serving"));
}

TEST_CASE("library: lazy reads without a mount, errors as Status, logs to a callback",
          "[library]") {
  LibRig rig;
  std::mutex m;
  std::vector<std::string> lines;
  log::set_sink([&](log::Level, std::string_view sys, std::string_view msg) {
    std::lock_guard lock(m);
    lines.push_back(std::string(sys) + ": " + std::string(msg));
  });
  ReaderOptions o;
  o.cache_dir = rig.dir.path() / "reader-cache";
  Status st;
  auto reader = LazyReader::open(rig.catalog, rig.source, o, st);
  REQUIRE(reader);
  std::vector<std::byte> buf(1000);
  size_t got = 0;
  REQUIRE(reader->read(kBig, 5 << 20, buf, got).ok());
  CHECK(got == 1000);
  CHECK(std::memcmp(buf.data(), source_bytes(kBig, 5 << 20, 1000).data(), 1000) == 0);
  CHECK(reader->engine().stats().fetched_bytes == 128u << 10);
  REQUIRE(reader->read(kBig, (16 << 20) - 10, buf, got).ok());
  CHECK(got == 10);  // short at the end of the file
  auto missing = reader->read("/no/such/file", 0, buf, got);
  CHECK(missing.errnum() == ENOENT);
  // A file missing on the source is reported, and logged through the sink.
  std::filesystem::remove(rig.dir.path().string() +
                          "/source/srv/lazyfs-fixture-a/state/counter.db");
  auto gone = reader->read("/srv/lazyfs-fixture-a/state/counter.db", 0, buf, got);
  CHECK(gone.errnum() == EIO);
  log::set_sink({});
  std::lock_guard lock(m);
  CHECK(std::any_of(lines.begin(), lines.end(), [](const std::string& l) {
    return l.find("counter.db") != std::string::npos;
  }));
}

TEST_CASE("library: a prefetch wait ends when the trace is local, or at its bound", "[library]") {
  ScratchDir dir("libpf");
  copy_fixture(dir.path() / "images");
  const auto catalog = Catalog::load(dir.path() / "images");
  auto source = std::make_shared<FakeSource>();
  for (const auto& f : catalog.files())
    source->add(f.path, f.size.value_or(0), f.mode.value_or(S_IFREG | 0644));
  FilesystemOptions o;
  o.control_socket = false;
  o.prefetch = {{kBig, 0, 3 << 20}, {kBig, 10 << 20, 1 << 20}};
  o.prefetch_wait = 700ms;
  const auto mount = [&](const std::string& name) {
    o.cache_dir = dir.path() / ("cache-" + name);
    Status st;
    auto fs = Filesystem::create(catalog, source, o, st);
    REQUIRE(fs);
    const auto mnt = dir.path() / ("mnt-" + name);
    std::filesystem::create_directories(mnt);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(fs->mount(mnt).ok());
    return std::make_pair(std::move(fs), std::chrono::steady_clock::now() - t0);
  };

  SECTION("a source that answers: mount returns with the trace local") {
    auto [fs, took] = mount("a");
    auto st = nlohmann::json::parse(fs->status_json());
    // (A fetch job may still be ending: its bytes are in, so not inflight.)
    CHECK(st["fetched_bytes"].get<uint64_t>() >= 4u << 20);
    fs->stop();
  }
  SECTION("a source that hangs: mount returns at the bound, the prefetch still running") {
    source->close_gate();
    auto [fs, took] = mount("b");
    CHECK(took >= 700ms);
    CHECK(took < 20s);  // the bound, not the source's time-outs
    CHECK(nlohmann::json::parse(fs->status_json())["fetched_bytes"] == 0);
    source->open_gate();
    fs->stop();
  }
}
