// The block cache: what is present, local bytes winning over fetched ones,
// truncation, persistence of the range map, rejection of every damaged or
// foreign map, the cache directory's permissions, the flush order under
// crashes (exact points and random SIGKILLs), and concurrent use.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../lib/src/cache_hooks.h"
#include "lazyfs/cache.h"
#include "lazyfs/fileio.h"
#include "lazyfs/hash.h"
#include "lazyfs/log.h"
#include "test_util.h"

using lazyfs::BlockCache;
using lazyfs::CacheFile;
using lazyfs::Range;
using lazyfs::RangeSet;
using lazyfs::SharedFd;
using lazyfs::Status;
using lazyfs::test::ScratchDir;
namespace fs = std::filesystem;
namespace hooks = lazyfs::cache_hooks;

namespace {

int wait_child(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return status;
}

}  // namespace

namespace {

constexpr uint64_t kEnd = std::numeric_limits<uint64_t>::max();
const std::string kCheckpoint = "ckpt-0123";

uint64_t mix(uint64_t off) {
  off ^= off >> 31;
  off *= 0x9e3779b97f4a7c15ULL;
  return off >> 40;
}

// The source's bytes (1..127) and the bytes local writes store (128..254):
// never equal to each other or to the zeros of a hole.
uint8_t fetched_byte(uint64_t off) {
  return static_cast<uint8_t>(1 + mix(off) % 127);
}
uint8_t local_byte(uint64_t off) {
  return static_cast<uint8_t>(128 + mix(off) % 127);
}

std::vector<std::byte> fetched(uint64_t off, size_t len) {
  std::vector<std::byte> v(len);
  for (size_t i = 0; i < len; ++i) v[i] = std::byte{fetched_byte(off + i)};
  return v;
}
std::vector<std::byte> local(uint64_t off, size_t len) {
  std::vector<std::byte> v(len);
  for (size_t i = 0; i < len; ++i) v[i] = std::byte{local_byte(off + i)};
  return v;
}

std::vector<uint8_t> read_data(CacheFile& f, Range r) {
  std::vector<uint8_t> out(r.size());
  if (auto ec = lazyfs::pread_all(f.fd()->get(), out.data(), out.size(), r.begin)) {
    FAIL(fmt::format("pread [{},{}): {}", r.begin, r.end, ec.message()));
  }
  return out;
}

unsigned mode_of(const fs::path& p) {
  struct stat st;
  REQUIRE(::stat(p.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

// The bytes a file claims present, in order: what must survive a reopen.
// (The data file may hold more: writes the map never recorded.)
std::vector<uint8_t> claimed_bytes(CacheFile& f) {
  std::vector<uint8_t> out;
  for (Range r : f.present_set().intersect({0, f.size()})) {
    auto part = read_data(f, r);
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

std::unique_ptr<CacheFile> open_file(const fs::path& base, uint64_t size,
                                     const std::string& path = "/srv/data.bin",
                                     const std::string& checkpoint = kCheckpoint) {
  Status st;
  auto f = CacheFile::open(base, checkpoint, path, size, st);
  INFO(st.message());
  REQUIRE(st.ok());
  REQUIRE(f);
  return f;
}

void require_ok(const Status& st) {
  INFO(st.message());
  REQUIRE(st.ok());
}

// Captures log lines for the life of the object instead of printing them.
class LogCapture {
 public:
  LogCapture() {
    lazyfs::log::set_sink([this](lazyfs::log::Level, std::string_view sub, std::string_view msg) {
      std::lock_guard lock(mutex_);
      lines_.push_back(std::string(sub) + ": " + std::string(msg));
    });
  }
  ~LogCapture() { lazyfs::log::set_sink({}); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  bool has(const std::string& needle) {
    std::lock_guard lock(mutex_);
    for (const auto& l : lines_) {
      if (l.find(needle) != std::string::npos) return true;
    }
    return false;
  }
  void clear() {
    std::lock_guard lock(mutex_);
    lines_.clear();
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> lines_;
};

// Every byte a file claims present holds what it should: fetched bytes the
// source's pattern, local bytes the local pattern or zeros. `mixed_from`:
// bytes from there on may also hold a local write whose local mark a crash
// lost (the write itself reached the page cache).
void check_claims(CacheFile& f, uint64_t mixed_from = kEnd) {
  RangeSet local = f.local_set();
  for (Range r : f.present_set().intersect({0, f.size()})) {
    auto bytes = read_data(f, r);
    for (uint64_t off = r.begin; off < r.end; ++off) {
      uint8_t b = bytes[off - r.begin];
      bool ok;
      if (local.contains({off, off + 1})) {
        ok = b == local_byte(off) || b == 0;
      } else {
        ok = b == fetched_byte(off) || (off >= mixed_from && b == local_byte(off));
      }
      if (!ok) {
        FAIL(fmt::format("byte {} is {} (fetched {}, local {}, local-marked {})", off, b,
                         fetched_byte(off), local_byte(off), local.contains({off, off + 1})));
      }
    }
  }
}

// The map format as documented at the top of lib/src/cache.cc, written
// independently so that the tests can craft maps the cache never would.
struct MapSpec {
  std::string checkpoint = kCheckpoint;
  std::string path = "/srv/data.bin";
  uint64_t source_size = 4096;
  uint64_t size = 4096;
  std::vector<Range> present;
  std::vector<Range> local;
  uint32_t version = 1;
  std::string trailing;
};

std::string make_map(const MapSpec& m) {
  std::string out("LZFSMAP\0", 8);
  auto u32 = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  auto u64 = [&](uint64_t v) {
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  u32(m.version);
  u32(static_cast<uint32_t>(m.checkpoint.size()));
  out += m.checkpoint;
  u32(static_cast<uint32_t>(m.path.size()));
  out += m.path;
  u64(m.source_size);
  u64(m.size);
  for (const auto* set : {&m.present, &m.local}) {
    u64(set->size());
    for (Range r : *set) {
      u64(r.begin);
      u64(r.end);
    }
  }
  out += m.trailing;
  out += lazyfs::sha256_hex(out);
  return out;
}

void write_string(const fs::path& p, const std::string& s) {
  lazyfs::test::write_bytes(p, std::vector<uint8_t>(s.begin(), s.end()));
}

fs::path data_of(const fs::path& base) {
  return fs::path(base.string() + ".data");
}
fs::path map_of(const fs::path& base) {
  return fs::path(base.string() + ".map");
}

constexpr const char* kMapAttribute = "user.lazyfs";

// The map kept in the data file's attribute, if it has one.
std::optional<std::vector<uint8_t>> map_attribute(const fs::path& base) {
  std::vector<uint8_t> v(1 << 16);
  const ssize_t n = ::lgetxattr(data_of(base).c_str(), kMapAttribute, v.data(), v.size());
  if (n < 0) return std::nullopt;
  v.resize(static_cast<size_t>(n));
  return v;
}

void set_map_attribute(const fs::path& base, const std::vector<uint8_t>& v) {
  REQUIRE(::lsetxattr(data_of(base).c_str(), kMapAttribute, v.data(), v.size(), 0) == 0);
}

bool has_map(const fs::path& base) {
  return map_attribute(base) || fs::exists(map_of(base));
}

// The map's bytes where the cache reads it from (the attribute first).
std::vector<uint8_t> map_bytes(const fs::path& base) {
  if (auto a = map_attribute(base)) return *a;
  return fs::exists(map_of(base)) ? lazyfs::test::read_bytes(map_of(base)) : std::vector<uint8_t>{};
}

// Whether `dir`'s file system takes user extended attributes (ext4 and
// tmpfs here do); where it does not, every map is a .map file.
bool user_attributes(const fs::path& dir) {
  const auto probe = dir / "attribute-probe";
  lazyfs::test::write_bytes(probe, {});
  const bool ok = ::lsetxattr(probe.c_str(), "user.probe", "x", 1, 0) == 0;
  fs::remove(probe);
  if (!ok) WARN("no user extended attributes under " << dir << ": only .map files are tested");
  return ok;
}

// While it lives, caches keep every map in a .map file, as on a file system
// without user extended attributes.
class MapFiles {
 public:
  explicit MapFiles(bool on = true) : before_(hooks::no_attribute_maps) {
    hooks::no_attribute_maps = on;
  }
  ~MapFiles() { hooks::no_attribute_maps = before_; }
  MapFiles(const MapFiles&) = delete;
  MapFiles& operator=(const MapFiles&) = delete;

 private:
  bool before_;
};

}  // namespace

TEST_CASE("cache: fetched bytes become present", "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  auto f = open_file(base, 1000);
  CHECK(f->size() == 1000);
  CHECK(f->source_size() == 1000);
  CHECK(f->path() == "/srv/data.bin");
  CHECK(f->present_bytes() == 0);
  CHECK_FALSE(f->present({0, 1}));
  CHECK(f->present({5, 5}));
  CHECK(f->missing({0, 1000}) == std::vector<Range>{{0, 1000}});
  CHECK_FALSE(f->dirty());
  // A cold file takes no disk until its first write.
  CHECK_FALSE(fs::exists(data_of(base)));

  require_ok(f->write_fetched(100, fetched(100, 50)));
  CHECK(fs::file_size(data_of(base)) == 1000);
  CHECK(mode_of(data_of(base)) == 0600);
  CHECK(f->present({100, 150}));
  CHECK_FALSE(f->present({99, 150}));
  CHECK(f->missing({0, 1000}) == std::vector<Range>{{0, 100}, {150, 1000}});
  CHECK(f->present_bytes() == 50);
  CHECK(f->local_bytes() == 0);
  CHECK(f->dirty());
  auto got = read_data(*f, {100, 150});
  for (uint64_t i = 0; i < 50; ++i) CHECK(got[i] == fetched_byte(100 + i));

  SECTION("bytes past the end are dropped and never missing") {
    require_ok(f->write_fetched(990, fetched(990, 20)));
    CHECK(f->present({990, 1000}));
    CHECK(f->present({990, 2000}));
    CHECK(f->missing({990, 2000}).empty());
    CHECK(f->missing({1000, 2000}).empty());
    CHECK(f->present_set().ranges() == std::vector<Range>{{100, 150}, {990, 1000}});
    CHECK(fs::file_size(data_of(base)) == 1000);
    require_ok(f->write_fetched(5000, fetched(5000, 20)));
    require_ok(f->write_fetched(kEnd - 3, fetched(0, 20)));
    CHECK(f->present_bytes() == 60);
  }

  SECTION("flush records the map and is a no-op when clean") {
    const bool attributes = user_attributes(dir.path());
    require_ok(f->flush());
    CHECK_FALSE(f->dirty());
    // In the data file's attribute: no second inode.
    CHECK(map_attribute(base).has_value() == attributes);
    CHECK(fs::exists(map_of(base)) == !attributes);
    struct stat before;
    REQUIRE(::stat(data_of(base).c_str(), &before) == 0);
    require_ok(f->flush());
    struct stat after;
    REQUIRE(::stat(data_of(base).c_str(), &after) == 0);
    CHECK(before.st_ctim.tv_nsec == after.st_ctim.tv_nsec);  // not rewritten
    CHECK(before.st_ctim.tv_sec == after.st_ctim.tv_sec);
    // A fetch of bytes already present changes nothing.
    require_ok(f->write_fetched(100, fetched(100, 50)));
    CHECK_FALSE(f->dirty());
    require_ok(f->write_fetched(120, fetched(120, 40)));
    CHECK(f->dirty());
  }
}

TEST_CASE("cache: without attributes the map is a .map file", "[cache]") {
  MapFiles files;
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  auto f = open_file(base, 1000);
  require_ok(f->write_fetched(100, fetched(100, 50)));
  require_ok(f->flush());
  CHECK_FALSE(f->dirty());
  CHECK_FALSE(map_attribute(base));
  CHECK(mode_of(map_of(base)) == 0600);
  struct stat before;
  REQUIRE(::stat(map_of(base).c_str(), &before) == 0);
  require_ok(f->flush());
  struct stat after;
  REQUIRE(::stat(map_of(base).c_str(), &after) == 0);
  CHECK(before.st_ino == after.st_ino);  // not rewritten
  require_ok(f->write_fetched(120, fetched(120, 40)));
  require_ok(f->flush());
  CHECK(!fs::exists(fs::path(map_of(base).string() + ".tmp-lazyfs")));
  f = open_file(base, 1000);
  CHECK(f->present_set().ranges() == std::vector<Range>{{100, 160}});
}

TEST_CASE("cache: locally written bytes are never overwritten by a fetch", "[cache]") {
  ScratchDir dir("cache");
  auto f = open_file(dir.path() / "f", 1000);
  require_ok(f->write_local(200, local(200, 10)));
  CHECK(f->local_set().ranges() == std::vector<Range>{{200, 210}});
  CHECK(f->present_set().ranges() == std::vector<Range>{{200, 210}});
  CHECK(f->local_bytes() == 10);
  CHECK(f->size() == 1000);

  require_ok(f->write_fetched(150, fetched(150, 100)));
  CHECK(f->present_set().ranges() == std::vector<Range>{{150, 250}});
  CHECK(f->local_set().ranges() == std::vector<Range>{{200, 210}});
  auto got = read_data(*f, {150, 250});
  for (uint64_t off = 150; off < 250; ++off) {
    INFO(off);
    CHECK(got[off - 150] == (off >= 200 && off < 210 ? local_byte(off) : fetched_byte(off)));
  }

  // A second fetch over the same bytes, even with other content, leaves them.
  std::vector<std::byte> junk(100, std::byte{0xee});
  require_ok(f->write_fetched(150, junk));
  CHECK(read_data(*f, {150, 250}) == got);

  // A local write over fetched bytes takes them over.
  require_ok(f->write_local(160, local(160, 5)));
  CHECK(f->local_set().ranges() == std::vector<Range>{{160, 165}, {200, 210}});
  require_ok(f->write_fetched(150, fetched(150, 100)));
  check_claims(*f);
}

TEST_CASE("cache: truncate shrinks and extends locally", "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";

  SECTION("shrink then extend reads zeros, never missing") {
    auto f = open_file(base, 100);
    require_ok(f->write_fetched(0, fetched(0, 100)));
    require_ok(f->truncate_local(40));
    CHECK(f->size() == 40);
    CHECK(fs::file_size(data_of(base)) == 40);
    CHECK(f->present_set().ranges() == std::vector<Range>{{0, kEnd}});
    CHECK(f->local_set().ranges() == std::vector<Range>{{40, kEnd}});
    CHECK(f->present_bytes() == 40);
    CHECK(f->local_bytes() == 0);
    // Shrinking wrote the map at once.
    CHECK_FALSE(f->dirty());
    CHECK(has_map(base));

    require_ok(f->truncate_local(80));
    CHECK(f->size() == 80);
    CHECK(fs::file_size(data_of(base)) == 80);
    CHECK(f->missing({0, 80}).empty());
    CHECK(f->local_bytes() == 40);
    auto got = read_data(*f, {0, 80});
    for (uint64_t off = 0; off < 80; ++off) {
      INFO(off);
      CHECK(got[off] == (off < 40 ? fetched_byte(off) : 0));
    }
    // A late fetch of the old content does not resurrect it.
    require_ok(f->write_fetched(0, fetched(0, 100)));
    CHECK(read_data(*f, {0, 80}) == got);
    check_claims(*f);
  }

  SECTION("extending past the source size") {
    auto f = open_file(base, 100);
    require_ok(f->truncate_local(150));
    CHECK(f->missing({0, 150}) == std::vector<Range>{{0, 100}});
    CHECK(f->local_bytes() == 50);
    CHECK(f->dirty());
    require_ok(f->write_fetched(0, fetched(0, 150)));
    CHECK(f->missing({0, 150}).empty());
    auto got = read_data(*f, {0, 150});
    for (uint64_t off = 0; off < 150; ++off) CHECK(got[off] == (off < 100 ? fetched_byte(off) : 0));
  }

  SECTION("a write past the end grows the file and the hole is local") {
    auto f = open_file(base, 100);
    require_ok(f->write_local(120, local(120, 10)));
    CHECK(f->size() == 130);
    CHECK(f->missing({0, 130}) == std::vector<Range>{{0, 100}});
    CHECK(f->local_bytes() == 30);
    auto got = read_data(*f, {100, 130});
    for (uint64_t off = 100; off < 130; ++off) {
      CHECK(got[off - 100] == (off < 120 ? 0 : local_byte(off)));
    }
    // A write straddling the end.
    require_ok(f->write_local(125, local(125, 10)));
    CHECK(f->size() == 135);
    CHECK(f->missing({0, 200}) == std::vector<Range>{{0, 100}});
  }

  SECTION("truncate to zero and to the same size") {
    auto f = open_file(base, 100);
    require_ok(f->truncate_local(100));
    CHECK_FALSE(f->dirty());
    CHECK(f->local_bytes() == 0);
    require_ok(f->truncate_local(0));
    CHECK(f->size() == 0);
    CHECK(f->missing({0, 100}).empty());
    CHECK(fs::file_size(data_of(base)) == 0);
    require_ok(f->write_local(10, local(10, 5)));
    CHECK(f->size() == 15);
    auto got = read_data(*f, {0, 15});
    for (uint64_t off = 0; off < 15; ++off) CHECK(got[off] == (off < 10 ? 0 : local_byte(off)));
  }

  SECTION("sizes beyond an off_t are refused") {
    auto f = open_file(base, 100);
    CHECK(f->truncate_local(kEnd).errnum() == EFBIG);
    CHECK(f->write_local(kEnd - 2, local(0, 10)).errnum() == EFBIG);
    CHECK(f->size() == 100);
  }
}

TEST_CASE("cache: the map persists what was flushed", "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  RangeSet present;
  RangeSet local_set;
  uint64_t size = 0;
  std::vector<uint8_t> bytes;
  {
    auto f = open_file(base, 10000);
    require_ok(f->write_fetched(0, fetched(0, 1000)));
    require_ok(f->write_fetched(5000, fetched(5000, 3000)));
    require_ok(f->write_local(500, local(500, 1000)));
    require_ok(f->truncate_local(12000));
    require_ok(f->write_local(11000, local(11000, 10)));
    require_ok(f->flush());
    present = f->present_set();
    local_set = f->local_set();
    size = f->size();
    bytes = claimed_bytes(*f);
    // Changes after the last flush are lost with the object.
    require_ok(f->write_fetched(2000, fetched(2000, 100)));
    require_ok(f->write_local(12000, local(12000, 100)));
  }
  auto f = open_file(base, 10000);
  CHECK(f->size() == size);
  CHECK(f->present_set() == present);
  CHECK(f->local_set() == local_set);
  CHECK(claimed_bytes(*f) == bytes);
  CHECK(fs::file_size(data_of(base)) == size);  // the unrecorded write past the end is cut
  CHECK_FALSE(f->dirty());
  check_claims(*f);

  // A truncate that shrinks is recorded at once, without a flush.
  require_ok(f->truncate_local(700));
  f.reset();
  f = open_file(base, 10000);
  CHECK(f->size() == 700);
  CHECK(f->missing({0, 10000}).empty());
  CHECK(f->local_set().ranges() == std::vector<Range>{{500, kEnd}});
  check_claims(*f);
}

TEST_CASE("cache: a map for another checkpoint, path or size starts cold", "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  {
    auto f = open_file(base, 4096);
    require_ok(f->write_fetched(0, fetched(0, 4096)));
    require_ok(f->write_local(10, local(10, 10)));
    require_ok(f->flush());
  }
  LogCapture logs;
  std::unique_ptr<CacheFile> f;
  std::string reason;
  SECTION("checkpoint") {
    f = open_file(base, 4096, "/srv/data.bin", "ckpt-other");
    reason = "another checkpoint";
  }
  SECTION("path") {
    f = open_file(base, 4096, "/srv/other.bin");
    reason = "another path";
  }
  SECTION("source size") {
    f = open_file(base, 4097);
    reason = "source size was 4096";
  }
  CHECK(f->present_bytes() == 0);
  CHECK(f->present_set().empty());
  CHECK(f->local_set().empty());
  CHECK(f->missing({0, f->size()}) == std::vector<Range>{{0, f->size()}});
  CHECK(f->size() == f->source_size());
  CHECK_FALSE(has_map(base));
  CHECK(read_data(*f, {0, f->size()}) == std::vector<uint8_t>(f->size(), 0));
  CHECK(logs.has("discarding map"));
  CHECK(logs.has(reason));
}

namespace {

lazyfs::SourceStat stat_with_mtime(int64_t mtime) {
  lazyfs::SourceStat st;
  st.mode = S_IFREG | 0640;
  st.size = 4096;
  st.uid = 1001;
  st.gid = 1002;
  st.atime = mtime + 5;
  st.mtime = mtime;
  return st;
}

std::unique_ptr<CacheFile> open_with_stat(const fs::path& base, int64_t mtime) {
  Status st;
  auto f = CacheFile::open(base, kCheckpoint, "/srv/data.bin", 4096, st, stat_with_mtime(mtime));
  INFO(st.message());
  REQUIRE(f);
  return f;
}

}  // namespace

TEST_CASE("cache: the map records the source's stat, a version 1 map has none", "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  {
    auto f = open_with_stat(base, 100);
    require_ok(f->write_fetched(0, fetched(0, 1000)));
    require_ok(f->flush());
  }
  auto f = open_file(base, 4096);  // without asking the source
  REQUIRE(f->source_stat());
  CHECK(f->source_stat()->mode == (S_IFREG | 0640));
  CHECK(f->source_stat()->uid == 1001);
  CHECK(f->source_stat()->gid == 1002);
  CHECK(f->source_stat()->atime == 105);
  CHECK(f->source_stat()->mtime == 100);
  CHECK(f->source_stat()->size == 4096);
  CHECK(f->present_set().ranges() == std::vector<Range>{{0, 1000}});
  CHECK_FALSE(f->wholly_present());
  f.reset();

  // A map of version 1 (before the stat) keeps its bytes; opened with the
  // source's stat, it records that stat at the next flush. (A cache of that
  // time has no attributes.)
  MapSpec v1;
  v1.present = {{0, 4096}};
  fs::remove(data_of(base));
  write_string(map_of(base), make_map(v1));
  lazyfs::test::write_bytes(data_of(base), std::vector<uint8_t>(4096, 7));
  f = open_file(base, 4096);
  CHECK_FALSE(f->source_stat());
  CHECK(f->wholly_present());
  f.reset();
  f = open_with_stat(base, 300);
  CHECK(f->wholly_present());
  CHECK(f->dirty());
  require_ok(f->flush());
  f.reset();
  if (user_attributes(dir.path())) {
    // The new map went to the attribute and the old file went.
    CHECK(map_attribute(base));
    CHECK_FALSE(fs::exists(map_of(base)));
  }
  f = open_file(base, 4096);
  REQUIRE(f->source_stat());
  CHECK(f->source_stat()->mtime == 300);
  CHECK(f->wholly_present());
}

TEST_CASE(
    "cache: a file changed on the source since part of it was cached forgets the fetched "
    "bytes, keeps the local ones",
    "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  {
    auto f = open_with_stat(base, 100);
    require_ok(f->write_fetched(0, fetched(0, 3000)));
    require_ok(f->write_local(1000, local(1000, 500)));
    require_ok(f->flush());
  }
  LogCapture logs;
  SECTION("same mtime: everything kept") {
    auto f = open_with_stat(base, 100);
    CHECK(f->present_set().ranges() == std::vector<Range>{{0, 3000}});
    CHECK_FALSE(f->dirty());
    CHECK_FALSE(logs.has("changed on the source"));
  }
  SECTION("new mtime") {
    auto f = open_with_stat(base, 200);
    CHECK(f->present_set().ranges() == std::vector<Range>{{1000, 1500}});
    CHECK(f->local_set().ranges() == std::vector<Range>{{1000, 1500}});
    CHECK(read_data(*f, {1000, 1500}) == [] {
      auto v = local(1000, 500);
      std::vector<uint8_t> out;
      for (auto b : v) out.push_back(static_cast<uint8_t>(b));
      return out;
    }());
    CHECK(f->source_stat()->mtime == 200);
    CHECK(logs.has("changed on the source (mtime 100 -> 200)"));
    CHECK(logs.has("dropping 2500 fetched bytes"));
    // The fetched bytes are fetched again from the new version, and the map
    // says so from the next flush on.
    require_ok(f->write_fetched(0, std::vector<std::byte>(4096, std::byte{9})));
    require_ok(f->flush());
    f.reset();
    f = open_with_stat(base, 200);
    CHECK(f->wholly_present());
    CHECK(read_data(*f, {0, 10}) == std::vector<uint8_t>(10, 9));
  }
  SECTION("another type") {
    auto st = stat_with_mtime(100);
    st.mode = S_IFDIR | 0755;
    Status status;
    auto f = CacheFile::open(base, kCheckpoint, "/srv/data.bin", 4096, status, st);
    REQUIRE(f);
    CHECK(f->present_set().ranges() == std::vector<Range>{{1000, 1500}});
  }
}

TEST_CASE("cache: a wholly cached file keeps its copy and stat when the source changes",
          "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  {
    auto f = open_with_stat(base, 100);
    require_ok(f->write_fetched(0, fetched(0, 4096)));
    require_ok(f->flush());
  }
  LogCapture logs;
  auto f = open_with_stat(base, 200);
  CHECK(f->wholly_present());
  CHECK(f->source_stat()->mtime == 100);
  CHECK(read_data(*f, {0, 4096}) == [] {
    std::vector<uint8_t> out;
    for (auto b : fetched(0, 4096)) out.push_back(static_cast<uint8_t>(b));
    return out;
  }());
  CHECK(logs.has("keeping the cached copy"));
}

TEST_CASE("cache: wholly_present_file opens only files the map says are whole", "[cache]") {
  ScratchDir dir("cache");
  Status st;
  auto cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
  REQUIRE(cache);
  const auto stat = stat_with_mtime(100);
  for (const char* path : {"/whole", "/part"}) {
    auto* f = cache->file(path, 4096, st, stat);
    REQUIRE(f);
    require_ok(f->write_fetched(0, fetched(0, std::string(path) == "/whole" ? 4096 : 10)));
  }
  require_ok(cache->flush_all());
  cache.reset();
  cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
  REQUIRE(cache);
  CHECK(cache->wholly_present_file("/cold", 4096) == nullptr);
  CHECK(cache->wholly_present_file("/part", 4096) == nullptr);
  auto* whole = cache->wholly_present_file("/whole", 4096);
  REQUIRE(whole);
  CHECK(whole->source_stat()->mtime == 100);
  CHECK(cache->file("/whole", 4096, st, stat_with_mtime(200)) == whole);
  // The partly cached file was closed again: opened now with the source's
  // new stat, it forgets its fetched bytes.
  auto* part = cache->file("/part", 4096, st, stat_with_mtime(200));
  REQUIRE(part);
  CHECK(part->present_bytes() == 0);
}

TEST_CASE("cache: a damaged map starts cold and never claims bytes", "[cache]") {
  ScratchDir dir("cache");
  const bool attributes = user_attributes(dir.path());
  for (const bool files : {false, true}) {
    if (!files && !attributes) continue;
    MapFiles store(files);
    INFO((files ? "in a .map file" : "in the attribute"));
    auto base = dir.path() / (files ? "file" : "attribute");
    {
      auto f = open_file(base, 4096);
      require_ok(f->write_fetched(0, fetched(0, 1000)));
      require_ok(f->write_fetched(2000, fetched(2000, 1000)));
      require_ok(f->write_local(500, local(500, 10)));
      require_ok(f->write_local(4000, local(4000, 200)));  // grows: a local tail
      require_ok(f->flush());
    }
    const auto good_map = map_bytes(base);
    REQUIRE(fs::exists(map_of(base)) == files);
    const auto good_data = lazyfs::test::read_bytes(data_of(base));
    const uint64_t size = 4200;
    LogCapture logs;

    auto reopen_with = [&](const std::vector<uint8_t>& map) {
      lazyfs::test::write_bytes(data_of(base), good_data);
      if (files) {
        lazyfs::test::write_bytes(map_of(base), map);
      } else {
        set_map_attribute(base, map);
      }
      return open_file(base, 4096);
    };
    auto require_cold = [&](const CacheFile& f, const std::string& what) {
      INFO(what);
      REQUIRE(f.present_set().empty());
      REQUIRE(f.local_set().empty());
      REQUIRE(f.size() == 4096);
      REQUIRE(!has_map(base));
    };

    {
      auto f = reopen_with(good_map);
      REQUIRE(f->size() == size);
      REQUIRE(f->present_bytes() == 1000 + 1000 + 200);
    }
    logs.clear();
    for (size_t i = 0; i < good_map.size(); ++i) {
      for (uint8_t flip : {uint8_t{0x01}, uint8_t{0x80}}) {
        auto map = good_map;
        map[i] ^= flip;
        auto f = reopen_with(map);
        require_cold(*f, fmt::format("byte {} xor {}", i, flip));
      }
    }
    for (size_t n = 0; n < good_map.size(); ++n) {
      auto f = reopen_with(std::vector<uint8_t>(good_map.data(), good_map.data() + n));
      require_cold(*f, fmt::format("truncated to {} bytes", n));
    }
    {
      auto map = good_map;
      map.push_back(0);
      auto f = reopen_with(map);
      require_cold(*f, "one byte appended");
      // The old data file is emptied (or removed with its attribute) by the
      // first write: none of its bytes can come back as present ones.
      require_ok(f->write_fetched(100, fetched(100, 10)));
      REQUIRE(fs::file_size(data_of(base)) == 4096);
      auto data = lazyfs::test::read_bytes(data_of(base));
      for (size_t i = 0; i < data.size(); ++i) {
        if (i < 100 || i >= 110) REQUIRE(data[i] == 0);
      }
    }
    CHECK(logs.has("discarding map"));
  }
}

TEST_CASE("cache: maps with a valid checksum but bad content are refused", "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  LogCapture logs;
  auto try_map = [&](const MapSpec& spec) {
    write_string(map_of(base), make_map(spec));
    lazyfs::test::write_bytes(data_of(base), std::vector<uint8_t>(spec.size, 7));
    return open_file(base, 4096);
  };

  // The test's encoder matches the format: a sane map is taken.
  {
    MapSpec ok;
    ok.size = 5000;
    ok.present = {{0, 10}, {20, 30}, {4096, kEnd}};
    ok.local = {{25, 30}, {4096, kEnd}};
    auto f = try_map(ok);
    CHECK(f->size() == 5000);
    CHECK(f->present_set().ranges() == ok.present);
    CHECK(f->local_set().ranges() == ok.local);
  }

  struct Bad {
    const char* what;
    MapSpec spec;
  };
  std::vector<Bad> bad;
  auto add = [&](const char* what, auto edit) {
    MapSpec s;
    s.present = {{0, 10}, {20, 30}};
    s.local = {{25, 30}};
    edit(s);
    bad.push_back({what, s});
  };
  add("unknown version", [](MapSpec& s) { s.version = 3; });
  add("range past size", [](MapSpec& s) { s.present = {{0, 10}, {4000, 4097}}; });
  add("tail not last", [](MapSpec& s) { s.present = {{0, kEnd}, {20, 30}}; });
  add("tail beginning past size", [](MapSpec& s) { s.present = {{4097, kEnd}}; });
  add("unsorted", [](MapSpec& s) { s.present = {{20, 30}, {0, 10}}; });
  add("overlapping", [](MapSpec& s) { s.present = {{0, 25}, {20, 30}}; });
  add("adjacent", [](MapSpec& s) { s.present = {{0, 20}, {20, 30}}; });
  add("empty range", [](MapSpec& s) { s.present = {{0, 10}, {15, 15}, {20, 30}}; });
  add("reversed range", [](MapSpec& s) { s.present = {{0, 10}, {30, 20}}; });
  add("local not present", [](MapSpec& s) { s.local = {{5, 15}}; });
  add("local past size", [](MapSpec& s) { s.local = {{5000, 5001}}; });
  add("trailing bytes", [](MapSpec& s) { s.trailing = "x"; });
  add("size too large", [](MapSpec& s) {
    s.size = kEnd;
    s.present.clear();
    s.local.clear();
  });
  add("other checkpoint", [](MapSpec& s) { s.checkpoint = "x"; });
  add("other path", [](MapSpec& s) { s.path = "/srv/data.bin2"; });
  add("other source size", [](MapSpec& s) { s.source_size = 4095; });

  for (const auto& b : bad) {
    INFO(b.what);
    // Size too large cannot be written as data; a small file stands in.
    MapSpec spec = b.spec;
    write_string(map_of(base), make_map(spec));
    lazyfs::test::write_bytes(data_of(base), std::vector<uint8_t>(4096, 7));
    auto f = open_file(base, 4096);
    CHECK(f->present_set().empty());
    CHECK(f->local_set().empty());
    CHECK(f->size() == 4096);
    CHECK(read_data(*f, {0, 4096}) == std::vector<uint8_t>(4096, 0));
  }

  SECTION("a data file shorter than the map's size") {
    MapSpec s;
    s.present = {{0, 10}};
    write_string(map_of(base), make_map(s));
    lazyfs::test::write_bytes(data_of(base), std::vector<uint8_t>(100, 7));
    auto f = open_file(base, 4096);
    CHECK(f->present_set().empty());
    CHECK(logs.has("data file holds 100 bytes"));
  }
  SECTION("a missing data file") {
    MapSpec s;
    s.present = {{0, 10}};
    write_string(map_of(base), make_map(s));
    fs::remove(data_of(base));
    auto f = open_file(base, 4096);
    CHECK(f->present_set().empty());
  }
}

namespace {

size_t open_fds() {
  return static_cast<size_t>(
      std::distance(fs::directory_iterator("/proc/self/fd"), fs::directory_iterator{}));
}

std::vector<uint8_t> as_bytes(const std::vector<std::byte>& v) {
  std::vector<uint8_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size());
  return out;
}

}  // namespace

TEST_CASE("cache: at most max_open_files data files stay open, closed ones reopen intact",
          "[cache]") {
  ScratchDir dir("cache");
  Status st;
  constexpr size_t kMax = 8;
  constexpr size_t kFiles = 100;
  const auto path_of = [](size_t i) { return fmt::format("/srv/f{:03}", i); };
  const size_t fds_before = open_fds();
  auto cache = BlockCache::open(dir.path() / "c", kCheckpoint, st, kMax);
  REQUIRE(cache);
  CHECK(cache->max_open_files() == kMax);
  for (size_t i = 0; i < kFiles; ++i) {
    auto* f = cache->file(path_of(i), 4096, st);
    REQUIRE(f);
    require_ok(f->write_fetched(0, fetched(i * 4096, 4096)));
    CHECK(cache->open_files() <= kMax);
  }
  CHECK(open_fds() <= fds_before + kMax + 2);  // + the cache directory and its lock
  // A reader keeps the descriptor it was given after the file is closed.
  auto* first = cache->file(path_of(0), 4096, st);
  const SharedFd held = first->fd();
  REQUIRE(held);
  // Half of them changed again after the closing, and flushed one by one
  // (the closed ones through a syncfs), the rest in a batch.
  for (size_t i = 1; i < kFiles; i += 2) {
    auto* f = cache->file(path_of(i), 4096, st);
    require_ok(f->write_local(10, local(10, 10)));
    require_ok(f->flush());
  }
  std::vector<uint8_t> got(4096);
  REQUIRE(lazyfs::pread_all(held->get(), got.data(), got.size(), 0).value() == 0);
  CHECK(got == as_bytes(fetched(0, 4096)));
  require_ok(cache->flush_all());
  CHECK(cache->open_files() <= kMax);
  cache.reset();

  cache = BlockCache::open(dir.path() / "c", kCheckpoint, st, kMax);
  REQUIRE(cache);
  for (size_t i = 0; i < kFiles; ++i) {
    auto* f = cache->file(path_of(i), 4096, st);
    REQUIRE(f);
    INFO(path_of(i));
    CHECK(f->wholly_present());
    auto want = as_bytes(fetched(i * 4096, 4096));
    if (i % 2 == 1) {
      auto l = as_bytes(local(10, 10));
      std::copy(l.begin(), l.end(), want.begin() + 10);
    }
    CHECK(read_data(*f, {0, 4096}) == want);
    CHECK(cache->open_files() <= kMax);
  }
}

TEST_CASE("cache: many files on few descriptors, used from many threads, stay consistent",
          "[cache]") {
  ScratchDir dir("cache");
  Status st;
  constexpr uint64_t kSize = 16 * 1024;
  constexpr size_t kFiles = 16;
  auto cache = BlockCache::open(dir.path() / "c", kCheckpoint, st, 4);
  REQUIRE(cache);
  std::vector<CacheFile*> files;
  for (size_t i = 0; i < kFiles; ++i) {
    files.push_back(cache->file(fmt::format("/srv/m{}", i), kSize, st));
    REQUIRE(files.back());
  }
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string first_error;
  auto check = [&](bool ok, const std::string& what) {
    if (ok) return;
    std::lock_guard lock(error_mutex);
    if (first_error.empty()) first_error = what;
    failed = true;
  };
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(500 + t);
      std::vector<uint8_t> buf;
      for (int i = 0; i < 1500 && !failed; ++i) {
        CacheFile* f = files[rng() % kFiles];
        const uint64_t off = rng() % kSize;
        const uint64_t len = 1 + rng() % 2048;
        switch (rng() % 5) {
          case 0:
          case 1: {
            const Status s = f->write_fetched(off, fetched(off, len));
            check(s.ok(), "write_fetched: " + s.message());
            break;
          }
          case 2: {
            const Status s = f->write_local(off, local(off, len));
            check(s.ok(), "write_local: " + s.message());
            break;
          }
          case 3: {
            const Status s = f->flush();
            check(s.ok(), "flush: " + s.message());
            break;
          }
          default: {
            const Range r{off, std::min(kSize, off + len)};
            if (!f->present(r)) break;
            const SharedFd fd = f->fd();
            check(fd != nullptr, "fd");
            if (!fd) break;
            buf.resize(r.size());
            const ssize_t n = ::pread(fd->get(), buf.data(), buf.size(), static_cast<off_t>(off));
            check(n == static_cast<ssize_t>(r.size()), "short pread");
            for (ssize_t k = 0; k < n; ++k) {
              const uint64_t o = off + static_cast<uint64_t>(k);
              const uint8_t b = buf[static_cast<size_t>(k)];
              check(b == fetched_byte(o) || b == local_byte(o),
                    fmt::format("read {} at {} of {}", b, o, f->path()));
            }
          }
        }
      }
    });
  }
  threads.emplace_back([&] {
    for (int i = 0; i < 30 && !failed; ++i) {
      const Status s = cache->flush_all();
      check(s.ok(), "flush_all: " + s.message());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (auto& t : threads) t.join();
  INFO(first_error);
  REQUIRE_FALSE(failed);
  CHECK(cache->open_files() <= 4);
  require_ok(cache->flush_all());
  std::vector<std::vector<uint8_t>> claimed;
  for (auto* f : files) claimed.push_back(claimed_bytes(*f));
  cache.reset();
  cache = BlockCache::open(dir.path() / "c", kCheckpoint, st, 4);
  REQUIRE(cache);
  for (size_t i = 0; i < kFiles; ++i) {
    auto* f = cache->file(fmt::format("/srv/m{}", i), kSize, st);
    REQUIRE(f);
    CHECK(claimed_bytes(*f) == claimed[i]);
  }
}

TEST_CASE("cache: block cache hands out one file per path", "[cache]") {
  ScratchDir scratch("cache");
  auto dir = scratch.path() / "c";
  Status st;
  auto cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  REQUIRE(cache);
  CHECK(cache->dir() == dir);

  auto* a = cache->file("/a", 100, st);
  require_ok(st);
  REQUIRE(a);
  CHECK(cache->file("/a", 100, st) == a);
  CHECK(cache->file("/a", 101, st) == nullptr);
  CHECK(st.errnum() == EINVAL);
  auto* b = cache->file("/b", 100, st);
  require_ok(st);
  CHECK(b != a);

  // Names are hashes: a hostile path cannot reach outside the directory.
  auto stem = cache->stem("/../../etc/passwd");
  CHECK(stem.size() == 64);
  CHECK(stem.find_first_not_of("0123456789abcdef") == std::string::npos);
  CHECK(stem == lazyfs::sha256_hex(kCheckpoint + std::string(1, '\0') + "/../../etc/passwd"));
  CHECK(cache->file("/../../etc/passwd", 10, st) != nullptr);
  for (const auto& e : fs::directory_iterator(dir)) {
    CHECK(e.path().filename().string().find("passwd") == std::string::npos);
  }

  require_ok(a->write_fetched(0, fetched(0, 100)));
  require_ok(b->write_local(0, local(0, 10)));
  CHECK(a->dirty());
  CHECK(b->dirty());
  require_ok(cache->flush_all());
  CHECK_FALSE(a->dirty());
  CHECK_FALSE(b->dirty());
  CHECK(has_map(dir / cache->stem("/a")));
  CHECK(fs::exists(dir / (cache->stem("/b") + ".data")));
}

TEST_CASE("cache: two checkpoints in one directory never share files", "[cache]") {
  ScratchDir scratch("cache");
  auto dir = scratch.path() / "c";
  Status st;
  {
    auto one = BlockCache::open(dir, "ckpt-one", st);
    require_ok(st);
    auto two = BlockCache::open(dir, "ckpt-two", st);
    require_ok(st);
    CHECK(one->stem("/x") != two->stem("/x"));
    auto* f1 = one->file("/x", 100, st);
    require_ok(st);
    auto* f2 = two->file("/x", 100, st);
    require_ok(st);
    require_ok(f1->write_fetched(0, fetched(0, 100)));
    CHECK(f2->present_bytes() == 0);
    CHECK(read_data(*f2, {0, 100}) == std::vector<uint8_t>(100, 0));
    require_ok(one->flush_all());
    require_ok(two->flush_all());
  }
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".lock") ++files;
  }
  // Two data files and, unless it is their attribute, one map (the second
  // file never changed).
  CHECK(files == (user_attributes(scratch.path()) ? 2 : 3));
  auto one = BlockCache::open(dir, "ckpt-one", st);
  auto two = BlockCache::open(dir, "ckpt-two", st);
  CHECK(one->file("/x", 100, st)->present_bytes() == 100);
  CHECK(two->file("/x", 100, st)->present_bytes() == 0);
}

TEST_CASE("cache: the cache directory is private", "[cache]") {
  ScratchDir scratch("cache");
  Status st;

  SECTION("created with mode 0700, parents too") {
    auto dir = scratch.path() / "a" / "b" / "c";
    auto cache = BlockCache::open(dir, kCheckpoint, st);
    require_ok(st);
    CHECK(mode_of(dir) == 0700);
    CHECK(mode_of(scratch.path() / "a") == 0700);
    // Opening it again is fine once it is closed.
    cache.reset();
    CHECK(BlockCache::open(dir, kCheckpoint, st));
    require_ok(st);
  }
  SECTION("one cache of a checkpoint at a time; other checkpoints share the directory") {
    auto dir = scratch.path() / "c";
    auto cache = BlockCache::open(dir, kCheckpoint, st);
    require_ok(st);
    CHECK_FALSE(BlockCache::open(dir, kCheckpoint, st));
    CHECK(st.errnum() == EBUSY);
    CHECK(st.message().find(fmt::format("(pid {})", ::getpid())) != std::string::npos);
    CHECK(BlockCache::open(dir, "another checkpoint", st));
    require_ok(st);
    // The lock is the open file's, so it goes with a crash too.
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      Status cst;
      auto other = BlockCache::open(dir, kCheckpoint, cst);
      ::_exit(!other && cst.errnum() == EBUSY ? 0 : 1);
    }
    CHECK(WEXITSTATUS(wait_child(child)) == 0);
    cache.reset();
    CHECK(BlockCache::open(dir, kCheckpoint, st));
    require_ok(st);
  }
  SECTION("a directory others can read is refused") {
    auto dir = scratch.path() / "open";
    fs::create_directory(dir);
    ::chmod(dir.c_str(), 0755);
    CHECK_FALSE(BlockCache::open(dir, kCheckpoint, st));
    CHECK(st.errnum() == EACCES);
    CHECK(st.message() == fmt::format("cache dir {} is accessible by others (mode 0755); use a "
                                      "private directory (mode 0700)",
                                      dir.string()));
    ::chmod(dir.c_str(), 0710);
    CHECK_FALSE(BlockCache::open(dir, kCheckpoint, st));
    CHECK(st.message().find("(mode 0710)") != std::string::npos);
  }
  SECTION("a file is refused") {
    auto file = scratch.path() / "file";
    write_string(file, "x");
    CHECK_FALSE(BlockCache::open(file, kCheckpoint, st));
    CHECK(st.errnum() == ENOTDIR);
  }
  SECTION("a directory owned by someone else is refused") {
    if (::geteuid() != 0) return;  // cannot give one away
    auto dir = scratch.path() / "theirs";
    fs::create_directory(dir);
    ::chmod(dir.c_str(), 0700);
    REQUIRE(::chown(dir.c_str(), 12345, 12345) == 0);
    CHECK_FALSE(BlockCache::open(dir, kCheckpoint, st));
    CHECK(st.message().find("owned by uid 12345") != std::string::npos);
  }
}

// ---------------------------------------------------------------------------
// Crash safety

namespace {

std::vector<hooks::FlushStep> g_steps;
std::vector<uint8_t> g_map_at_step;  // the map's bytes at kDataSynced
fs::path g_map_base;
hooks::FlushStep g_crash_at = hooks::FlushStep::kSnapshotTaken;

void record_step(hooks::FlushStep step) {
  g_steps.push_back(step);
  if (step == hooks::FlushStep::kDataSynced) g_map_at_step = map_bytes(g_map_base);
}

void crash_at_step(hooks::FlushStep step) {
  if (step == g_crash_at) ::_exit(0);
}

// Restores the hook even when a REQUIRE throws.
struct HookGuard {
  explicit HookGuard(void (*hook)(hooks::FlushStep)) { hooks::on_flush_step = hook; }
  ~HookGuard() { hooks::on_flush_step = nullptr; }
  HookGuard(const HookGuard&) = delete;
  HookGuard& operator=(const HookGuard&) = delete;
};

// Runs `body` in a child process that the flush hook ends at g_crash_at,
// and checks that it did end there.
template <typename Body>
void crash_in_child(Body body) {
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    body();
    ::_exit(3);  // the hook should have ended the process
  }
  int status = wait_child(pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
}

// The story both crash tests tell of a file: [0, 100) fetched and flushed;
// then [1000, 1100) fetched and [50, 60) written locally; then a flush
// that a crash ends. False if a step failed (the child exits 2).
bool write_then_flush_once(CacheFile& f) {
  return f.write_fetched(0, fetched(0, 100)).ok() && f.flush().ok() &&
         f.write_fetched(1000, fetched(1000, 100)).ok() && f.write_local(50, local(50, 10)).ok();
}

// What the file holds once reopened after the crash at `step`.
void check_after_crash(CacheFile& f, hooks::FlushStep step) {
  if (step == hooks::FlushStep::kMapWritten) {
    CHECK(f.present_set().ranges() == std::vector<Range>{{0, 100}, {1000, 1100}});
    CHECK(f.local_set().ranges() == std::vector<Range>{{50, 60}});
  } else {
    CHECK(f.present_set().ranges() == std::vector<Range>{{0, 100}});
    CHECK(f.local_set().empty());
  }
  // The local write reached the data file but, in the earlier steps, not
  // the map: bytes 50..60 may hold it.
  check_claims(f, 50);
}

// Runs `body(step)`, with g_crash_at = step, for each step of a flush, with
// the maps in attributes and then in .map files.
template <typename Body>
void at_each_step_in_both_stores(Body body) {
  for (const bool files : {false, true}) {
    MapFiles store(files);
    INFO((files ? "maps in .map files" : "maps in attributes"));
    for (auto step : {hooks::FlushStep::kSnapshotTaken, hooks::FlushStep::kDataSynced,
                      hooks::FlushStep::kMapWritten}) {
      INFO("step " << static_cast<int>(step));
      g_crash_at = step;
      body(step);
    }
  }
}

}  // namespace

TEST_CASE("cache: flush syncs the data before it replaces the map", "[cache]") {
  for (const bool files : {false, true}) {
    MapFiles store(files);
    INFO((files ? "in a .map file" : "in the attribute"));
    ScratchDir dir("cache");
    auto base = dir.path() / "f";
    auto f = open_file(base, 4096);
    require_ok(f->write_fetched(0, fetched(0, 100)));
    require_ok(f->flush());
    auto old_map = map_bytes(base);
    REQUIRE_FALSE(old_map.empty());

    require_ok(f->write_fetched(1000, fetched(1000, 100)));
    g_steps.clear();
    g_map_base = base;
    {
      HookGuard guard(record_step);
      require_ok(f->flush());
    }
    CHECK(g_steps == std::vector<hooks::FlushStep>{hooks::FlushStep::kSnapshotTaken,
                                                   hooks::FlushStep::kDataSynced,
                                                   hooks::FlushStep::kMapWritten});
    // After the data sync, the map on disk was still the old one.
    CHECK(g_map_at_step == old_map);
    CHECK(map_bytes(base) != old_map);
  }
}

TEST_CASE("cache: a crash at each step of a flush leaves a truthful map", "[cache]") {
  at_each_step_in_both_stores([&](hooks::FlushStep step) {
    ScratchDir dir("cache");
    auto base = dir.path() / "f";
    crash_in_child([&] {
      Status st;
      auto f = CacheFile::open(base, kCheckpoint, "/srv/data.bin", 4096, st);
      if (!f || !write_then_flush_once(*f)) ::_exit(2);
      hooks::on_flush_step = crash_at_step;
      (void)f->flush();
    });
    check_after_crash(*open_file(base, 4096), step);
  });
}

TEST_CASE("cache: flush_all commits many files in batches that reopen intact", "[cache]") {
  // More files than one batch holds, so that the batches are told apart.
  constexpr int kFiles = 2500;
  ScratchDir scratch("cache");
  auto dir = scratch.path() / "c";
  Status st;
  auto cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  std::vector<CacheFile*> files;
  for (int i = 0; i < kFiles; ++i) {
    auto* f = cache->file("/srv/f" + std::to_string(i), 4096, st);
    require_ok(st);
    require_ok(f->write_fetched(0, fetched(0, 100 + static_cast<size_t>(i % 1000))));
    files.push_back(f);
  }
  // A clean file is left alone: only the dirty ones are in a batch.
  require_ok(files[0]->flush());
  g_steps.clear();
  {
    HookGuard guard([](hooks::FlushStep step) { g_steps.push_back(step); });
    require_ok(cache->flush_all());
  }
  CHECK(g_steps.size() == 3 * 3);  // three batches of three steps
  for (auto* f : files) CHECK_FALSE(f->dirty());
  {
    HookGuard guard([](hooks::FlushStep step) { g_steps.push_back(step); });
    g_steps.clear();
    require_ok(cache->flush_all());
    CHECK(g_steps.empty());  // nothing changed: nothing written
  }
  cache.reset();
  cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  for (int i = 0; i < kFiles; ++i) {
    auto* f = cache->file("/srv/f" + std::to_string(i), 4096, st);
    require_ok(st);
    INFO("file " << i);
    REQUIRE(f->present_set().ranges() ==
            std::vector<Range>{{0, 100 + static_cast<uint64_t>(i % 1000)}});
    check_claims(*f);
  }
  // No temporary map is left behind.
  for (const auto& e : fs::directory_iterator(dir)) {
    CHECK(e.path().extension() != ".tmp-lazyfs");
  }
}

TEST_CASE("cache: flush_all writes first maps in place, and a torn one starts its file cold",
          "[cache]") {
  MapFiles files;
  constexpr int kFiles = 8;
  const auto name = [](int i) { return "/srv/f" + std::to_string(i); };
  ScratchDir scratch("cache");
  auto dir = scratch.path() / "c";
  Status st;
  auto cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  std::vector<fs::path> maps;
  for (int i = 0; i < kFiles; ++i) {
    auto* f = cache->file(name(i), 4096, st);
    require_ok(st);
    require_ok(f->write_fetched(0, fetched(0, 4096)));
    maps.push_back(dir / (cache->stem(name(i)) + ".map"));
    REQUIRE_FALSE(fs::exists(maps.back()));
  }
  // Where a crash tore a first map, a new flush finds the file there: it
  // replaces it through a temporary file, like any later map.
  lazyfs::test::write_bytes(maps[1], {'L', 'Z', 'F', 'S'});
  require_ok(cache->flush_all());
  struct stat first {};
  REQUIRE(::stat(maps[0].c_str(), &first) == 0);
  // A later map replaces the first one (a rename: a new inode).
  require_ok(cache->file(name(0), 4096, st)->write_local(0, local(0, 10)));
  require_ok(cache->flush_all());
  struct stat second {};
  REQUIRE(::stat(maps[0].c_str(), &second) == 0);
  CHECK(second.st_ino != first.st_ino);
  for (const auto& e : fs::directory_iterator(dir)) {
    CHECK(e.path().extension() != ".tmp-lazyfs");
  }
  cache.reset();

  // A crash while the first maps were written: one empty, one cut short.
  fs::resize_file(maps[2], 0);
  fs::resize_file(maps[3], fs::file_size(maps[3]) / 2);
  cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  for (int i = 0; i < kFiles; ++i) {
    auto* f = cache->file(name(i), 4096, st);
    require_ok(st);
    INFO("file " << i);
    if (i == 2 || i == 3) {
      CHECK(f->present_set().empty());  // cold, never wrong
    } else {
      CHECK(f->wholly_present());
      CHECK(f->local_set().ranges() ==
            (i == 0 ? std::vector<Range>{{0, 10}} : std::vector<Range>{}));
    }
    check_claims(*f);
  }
}

TEST_CASE("cache: a crash at each step of a batched flush leaves truthful maps", "[cache]") {
  constexpr int kFiles = 20;
  const auto name = [](int i) { return "/srv/f" + std::to_string(i); };
  at_each_step_in_both_stores([&](hooks::FlushStep step) {
    ScratchDir scratch("cache");
    auto dir = scratch.path() / "c";
    crash_in_child([&] {
      Status st;
      auto cache = BlockCache::open(dir, kCheckpoint, st);
      if (!cache) ::_exit(2);
      for (int i = 0; i < kFiles; ++i) {
        auto* f = cache->file(name(i), 4096, st);
        if (!f || !write_then_flush_once(*f)) ::_exit(2);
      }
      hooks::on_flush_step = crash_at_step;
      (void)cache->flush_all();
    });
    Status st;
    auto cache = BlockCache::open(dir, kCheckpoint, st);
    require_ok(st);
    for (int i = 0; i < kFiles; ++i) {
      auto* f = cache->file(name(i), 4096, st);
      require_ok(st);
      INFO("file " << i);
      check_after_crash(*f, step);
    }
  });
}

TEST_CASE("cache: a crash at each step of a shrinking truncate leaves a truthful map", "[cache]") {
  at_each_step_in_both_stores([&](hooks::FlushStep step) {
    ScratchDir dir("cache");
    auto base = dir.path() / "f";
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      Status st;
      auto f = CacheFile::open(base, kCheckpoint, "/srv/data.bin", 4096, st);
      if (!f || !f->write_fetched(0, fetched(0, 4096)).ok() || !f->flush().ok()) ::_exit(2);
      hooks::on_flush_step = crash_at_step;
      (void)f->truncate_local(1000);
      ::_exit(3);
    }
    int status = wait_child(pid);
    REQUIRE(WIFEXITED(status));
    REQUIRE(WEXITSTATUS(status) == 0);
    auto f = open_file(base, 4096);
    if (step == hooks::FlushStep::kMapWritten) {
      // The map says the file is cut, though the data file was not yet.
      CHECK(f->size() == 1000);
      CHECK(f->present_set().ranges() == std::vector<Range>{{0, kEnd}});
      CHECK(f->local_set().ranges() == std::vector<Range>{{1000, kEnd}});
      CHECK(fs::file_size(data_of(base)) == 1000);
    } else {
      // The old map, with every fetched byte still in the data file.
      CHECK(f->size() == 4096);
      CHECK(f->present_set().ranges() == std::vector<Range>{{0, 4096}});
      CHECK(f->local_set().empty());
    }
    check_claims(*f);
    // Growing again shows zeros past the cut, never the old bytes.
    require_ok(f->truncate_local(4096));
    check_claims(*f);
  });
}

namespace {

constexpr uint64_t kKillSize = 8 << 20;
constexpr uint64_t kKillLocalFrom = kKillSize / 2;
constexpr uint64_t kKillTruncate = kKillSize / 8;

// Writes fetched blocks anywhere and local blocks in the upper half, at
// random, now and then truncates within the top eighth, and flushes every
// few writes, until killed.
[[noreturn]] void write_until_killed(const fs::path& dir, uint32_t seed) {
  Status st;
  auto cache = BlockCache::open(dir, kCheckpoint, st);
  if (!cache) ::_exit(2);
  auto* f = cache->file("/srv/big.bin", kKillSize, st);
  if (!f) ::_exit(2);
  // A kill between a shrink and the extension after it.
  if (f->size() < kKillSize && !f->truncate_local(kKillSize).ok()) ::_exit(2);
  std::mt19937_64 rng(seed);
  for (uint64_t i = 0;; ++i) {
    uint64_t len = 1 + rng() % 16384;
    if (rng() % 16 == 0) {
      // Shrink into the top eighth and grow back: the cut bytes become local
      // zeros, and a map that still called them fetched would be caught.
      if (!f->truncate_local(kKillSize - rng() % kKillTruncate).ok() ||
          !f->truncate_local(kKillSize).ok()) {
        ::_exit(2);
      }
    } else if (rng() % 4 == 0) {
      uint64_t off = kKillLocalFrom + rng() % (kKillSize - kKillLocalFrom);
      len = std::min(len, kKillSize - off);
      if (!f->write_local(off, local(off, len)).ok()) ::_exit(2);
    } else {
      uint64_t off = rng() % kKillSize;
      if (!f->write_fetched(off, fetched(off, len)).ok()) ::_exit(2);
    }
    if (i % 4 == 3 && !f->flush().ok()) ::_exit(2);
  }
}

}  // namespace

TEST_CASE("cache: SIGKILL at random moments never leaves the map ahead of the data", "[cache]") {
  ScratchDir scratch("cache");
  auto dir = scratch.path() / "c";
  std::mt19937 rng(20240611);
  uint64_t claimed_ever = 0;
  for (int round = 0; round < 40; ++round) {
    INFO("round " << round);
    uint32_t seed = static_cast<uint32_t>(rng());
    auto delay = std::chrono::microseconds(rng() % 20001);
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) write_until_killed(dir, seed);
    std::this_thread::sleep_for(delay);
    ::kill(pid, SIGKILL);
    int status = wait_child(pid);
    REQUIRE(WIFSIGNALED(status));  // not an early exit on an error
    Status st;
    auto cache = BlockCache::open(dir, kCheckpoint, st);
    require_ok(st);
    auto* f = cache->file("/srv/big.bin", kKillSize, st);
    require_ok(st);
    REQUIRE(f->size() <= kKillSize);
    REQUIRE(f->size() >= kKillSize - kKillTruncate);
    RangeSet local_set = f->local_set();
    for (Range r : local_set.ranges()) REQUIRE(r.begin >= kKillLocalFrom);
    check_claims(*f, kKillLocalFrom);
    claimed_ever = std::max(claimed_ever, f->present_bytes());
  }
  // The rounds did get as far as flushing something.
  CHECK(claimed_ever > 0);
}

TEST_CASE("cache: concurrent writes, truncates and flushes stay consistent", "[cache]") {
  ScratchDir scratch("cache");
  auto dir = scratch.path() / "c";
  constexpr uint64_t kSize = 64 * 1024;
  Status st;
  auto cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  auto* f = cache->file("/srv/c.bin", kSize, st);
  require_ok(st);

  std::atomic<bool> failed{false};
  std::atomic<bool> stop{false};
  std::mutex error_mutex;
  std::string first_error;
  auto fail = [&](const std::string& what) {
    std::lock_guard lock(error_mutex);
    if (first_error.empty()) first_error = what;
    failed = true;
  };
  auto check = [&](const Status& s, const char* what) {
    if (!s.ok()) fail(std::string(what) + ": " + s.message());
  };

  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 2000 && !failed; ++i) {
        uint64_t off = rng() % (2 * kSize);
        uint64_t len = 1 + rng() % 4096;
        check(f->write_fetched(off, fetched(off, len)), "write_fetched");
      }
    });
  }
  for (uint32_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(200 + t);
      for (int i = 0; i < 1000 && !failed; ++i) {
        uint64_t off = rng() % (2 * kSize);
        uint64_t len = 1 + rng() % 2048;
        check(f->write_local(off, local(off, len)), "write_local");
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(300);
    for (int i = 0; i < 40 && !failed; ++i) {
      check(f->truncate_local(kSize / 2 + rng() % (kSize * 3 / 2)), "truncate_local");
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
    }
  });
  // A reader: whatever present() says is there holds a legal byte.
  std::thread reader([&] {
    std::mt19937_64 rng(400);
    std::vector<uint8_t> buf;
    while (!stop && !failed) {
      uint64_t off = rng() % (2 * kSize);
      Range r{off, off + 1 + rng() % 4096};
      if (!f->present(r)) {
        (void)f->missing(r);
        continue;
      }
      buf.resize(r.size());
      ssize_t n = ::pread(f->fd()->get(), buf.data(), buf.size(), static_cast<off_t>(r.begin));
      for (ssize_t i = 0; i < n; ++i) {
        uint64_t o = r.begin + static_cast<uint64_t>(i);
        uint8_t b = buf[static_cast<size_t>(i)];
        if (b != 0 && b != fetched_byte(o) && b != local_byte(o)) {
          fail(fmt::format("reader saw {} at {}", b, o));
        }
      }
      (void)f->present_bytes();
      (void)f->size();
    }
  });
  std::thread flusher([&] {
    while (!stop && !failed) {
      check(f->flush(), "flush");
      (void)f->dirty();
      std::this_thread::yield();
    }
  });
  for (auto& t : threads) t.join();
  stop = true;
  reader.join();
  flusher.join();
  INFO(first_error);
  REQUIRE_FALSE(failed);

  auto check_file = [&](CacheFile& file) {
    RangeSet present = file.present_set();
    for (Range r : file.local_set().ranges()) REQUIRE(present.contains(r));
    REQUIRE(fs::file_size(dir / (cache->stem("/srv/c.bin") + ".data")) == file.size());
    check_claims(file);
  };
  check_file(*f);
  require_ok(cache->flush_all());
  auto present = f->present_set();
  auto local_set = f->local_set();
  auto size = f->size();
  auto bytes = claimed_bytes(*f);
  cache.reset();
  cache = BlockCache::open(dir, kCheckpoint, st);
  require_ok(st);
  f = cache->file("/srv/c.bin", kSize, st);
  require_ok(st);
  CHECK(f->size() == size);
  CHECK(f->present_set() == present);
  CHECK(f->local_set() == local_set);
  CHECK(claimed_bytes(*f) == bytes);
  check_file(*f);
}

namespace {

// The attribute form of a map (lib/src/cache.cc), written independently.
struct AttributeSpec {
  uint8_t version = 3;
  uint64_t source_size = 4096;
  uint64_t stat_flag = 0;
  uint64_t size = 4096;
  // Raw (gap, length) pairs as stored: a gap from the previous range's end,
  // a length of 0 for the local tail.
  std::vector<std::pair<uint64_t, uint64_t>> present;
  std::vector<std::pair<uint64_t, uint64_t>> local;
  uint64_t present_count = kEnd;  // kEnd: present.size()
  std::string trailing;
  std::string path = "/srv/data.bin";
};

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

std::vector<uint8_t> make_attribute(const AttributeSpec& m) {
  std::string out{'L', static_cast<char>(m.version)};
  put_varint(out, m.source_size);
  put_varint(out, m.stat_flag);
  if (m.stat_flag == 1) {
    for (uint64_t v : {0100644u, 1000u, 1000u, 10u, 20u}) put_varint(out, v);
  }
  put_varint(out, m.size);
  put_varint(out, m.present_count == kEnd ? m.present.size() : m.present_count);
  for (auto [gap, length] : m.present) {
    put_varint(out, gap);
    put_varint(out, length);
  }
  put_varint(out, m.local.size());
  for (auto [gap, length] : m.local) {
    put_varint(out, gap);
    put_varint(out, length);
  }
  out += m.trailing;
  const std::string nul(1, '\0');
  out += lazyfs::Sha256()
             .update(kCheckpoint)
             .update(nul)
             .update(m.path)
             .update(nul)
             .update(out)
             .digest()
             .substr(0, 8);
  return {out.begin(), out.end()};
}

// Scattered ranges of 10 bytes, 1,000 apart: their map, some 4 KiB, is too
// long for the attribute.
void write_scattered(CacheFile& f, uint64_t from, bool local_bytes) {
  for (uint64_t off = from; off + 10 <= f.size() && off < from + 1000 * 1000; off += 1000) {
    require_ok(local_bytes ? f.write_local(off, local(off, 10))
                           : f.write_fetched(off, fetched(off, 10)));
  }
}

}  // namespace

TEST_CASE("cache: attributes with a valid digest but bad content are refused", "[cache]") {
  ScratchDir dir("cache");
  if (!user_attributes(dir.path())) return;
  auto base = dir.path() / "f";
  LogCapture logs;
  auto open_with = [&](const AttributeSpec& spec) {
    lazyfs::test::write_bytes(data_of(base), std::vector<uint8_t>(5000, 7));
    set_map_attribute(base, make_attribute(spec));
    return open_file(base, 4096);
  };
  {
    // The test's encoder matches the format: a sane map is taken.
    AttributeSpec ok;
    ok.size = 5000;
    ok.stat_flag = 1;
    ok.present = {{0, 10}, {10, 10}, {4066, 0}};  // [0,10) [20,30) [4096,end)
    ok.local = {{25, 5}, {4066, 0}};              // [25,30) [4096,end)
    auto f = open_with(ok);
    CHECK(f->size() == 5000);
    CHECK(f->present_set().ranges() == std::vector<Range>{{0, 10}, {20, 30}, {4096, kEnd}});
    CHECK(f->local_set().ranges() == std::vector<Range>{{25, 30}, {4096, kEnd}});
    REQUIRE(f->source_stat());
    CHECK(f->source_stat()->uid == 1000);
    CHECK(f->source_stat()->mtime == 10);  // zigzag
  }
  struct Bad {
    const char* what;
    const char* reason;
    AttributeSpec spec;
  };
  std::vector<Bad> bad;
  auto add = [&](const char* what, const char* reason, auto edit) {
    AttributeSpec s;
    s.present = {{0, 10}, {10, 10}};
    s.local = {{25, 5}};
    edit(s);
    bad.push_back({what, reason, s});
  };
  add("unknown version", "unknown version 4", [](AttributeSpec& s) { s.version = 4; });
  add("bad stat flag", "bad stat flag 2", [](AttributeSpec& s) { s.stat_flag = 2; });
  add("other source size", "source size was 4095", [](AttributeSpec& s) { s.source_size = 4095; });
  add("other path", "another path", [](AttributeSpec& s) { s.path = "/srv/other"; });
  add("size too large", "too large", [](AttributeSpec& s) { s.size = kEnd; });
  add("range past size", "past size", [](AttributeSpec& s) { s.present = {{4000, 97}}; });
  add("touching", "touching", [](AttributeSpec& s) { s.present = {{0, 10}, {0, 10}}; });
  add("tail not last", "past size", [](AttributeSpec& s) { s.present = {{0, 0}, {10, 10}}; });
  add("gap past the largest offset", "largest offset", [](AttributeSpec& s) {
    s.present = {{0, 10}, {kEnd - 5, 1}};
  });
  add("length past the largest offset", "largest offset", [](AttributeSpec& s) {
    s.present = {{10, kEnd - 5}};
  });
  add("count overruns", "overruns", [](AttributeSpec& s) { s.present_count = 1000; });
  add("truncated", "truncated", [](AttributeSpec& s) { s.present_count = 3; });
  add("local not present", "not present", [](AttributeSpec& s) { s.local = {{12, 2}}; });
  add("trailing bytes", "trailing", [](AttributeSpec& s) { s.trailing = "x"; });
  for (const auto& b : bad) {
    INFO(b.what);
    logs.clear();
    auto f = open_with(b.spec);
    CHECK(f->present_set().empty());
    CHECK(f->local_set().empty());
    CHECK(f->size() == 4096);
    CHECK_FALSE(has_map(base));
    CHECK(logs.has(b.reason));
    CHECK(read_data(*f, {0, 4096}) == std::vector<uint8_t>(4096, 0));
  }
}

TEST_CASE("cache: a map too long for the attribute goes to a .map file, and back", "[cache]") {
  ScratchDir dir("cache");
  if (!user_attributes(dir.path())) return;
  constexpr uint64_t kSize = 1 << 20;
  Status st;
  auto cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
  require_ok(st);
  const auto base = dir.path() / "c" / cache->stem("/f");
  // Through flush_all() (a batch) or CacheFile::flush() (one file).
  for (const bool batch : {true, false}) {
    INFO((batch ? "flush_all" : "flush"));
    const auto flush = [&](CacheFile& f) { require_ok(batch ? cache->flush_all() : f.flush()); };
    auto* f = cache->file("/f", kSize, st);
    REQUIRE(f);
    write_scattered(*f, batch ? 0 : 500, false);
    flush(*f);
    CHECK(fs::exists(map_of(base)));
    CHECK_FALSE(map_attribute(base));
    const RangeSet scattered = f->present_set();

    // Reopened, the .map file is the map; once the file is whole the map is
    // short again and goes back to the attribute.
    cache.reset();
    cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
    f = cache->file("/f", kSize, st);
    REQUIRE(f);
    CHECK(f->present_set() == scattered);
    check_claims(*f);
    require_ok(f->write_fetched(0, fetched(0, kSize)));
    flush(*f);
    CHECK(map_attribute(base));
    CHECK_FALSE(fs::exists(map_of(base)));
    cache.reset();
    cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
    f = cache->file("/f", kSize, st);
    CHECK(f->wholly_present());
    check_claims(*f);

    // A shrinking truncate of a file with a long map writes it to a .map
    // file and removes the attribute before it cuts the data file.
    write_scattered(*f, 0, true);
    require_ok(f->truncate_local(kSize - 5000));
    CHECK(fs::exists(map_of(base)));
    CHECK_FALSE(map_attribute(base));
    const RangeSet local_set = f->local_set();
    cache.reset();
    cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
    f = cache->file("/f", kSize, st);
    CHECK(f->size() == kSize - 5000);
    CHECK(f->local_set() == local_set);
    check_claims(*f);
    // Start the next round cold.
    cache.reset();
    fs::remove(base.string() + ".data");
    fs::remove(map_of(base));
    cache = BlockCache::open(dir.path() / "c", kCheckpoint, st);
  }
}

TEST_CASE("cache: a crash while a map moves between the attribute and a .map file", "[cache]") {
  {
    ScratchDir probe("cache");
    if (!user_attributes(probe.path())) return;
  }
  constexpr uint64_t kSize = 1 << 20;
  for (const bool to_file : {true, false}) {
    INFO((to_file ? "to the .map file" : "to the attribute"));
    for (auto step : {hooks::FlushStep::kSnapshotTaken, hooks::FlushStep::kDataSynced,
                      hooks::FlushStep::kMapWritten}) {
      INFO("step " << static_cast<int>(step));
      ScratchDir dir("cache");
      auto base = dir.path() / "f";
      g_crash_at = step;
      crash_in_child([&] {
        Status st;
        auto f = CacheFile::open(base, kCheckpoint, "/srv/data.bin", kSize, st);
        if (!f) ::_exit(2);
        // The first map in one place, the second in the other.
        if (to_file) {
          if (!f->write_fetched(0, fetched(0, 100)).ok()) ::_exit(2);
        } else {
          write_scattered(*f, 0, false);
        }
        if (!f->flush().ok()) ::_exit(2);
        if (to_file) {
          write_scattered(*f, 500, false);
        } else {
          if (!f->write_fetched(0, fetched(0, kSize)).ok()) ::_exit(2);
        }
        hooks::on_flush_step = crash_at_step;
        (void)f->flush();
      });
      auto f = open_file(base, kSize);
      const bool new_map = step == hooks::FlushStep::kMapWritten;
      if (to_file) {
        CHECK(f->present_set().count() == (new_map ? 1001 : 1));
      } else if (new_map) {
        CHECK(f->wholly_present());
      } else {
        CHECK(f->present_set().count() == 1000);
      }
      check_claims(*f);
    }
  }
}

TEST_CASE("cache: a .map file left without its data file never claims a new one's bytes",
          "[cache]") {
  ScratchDir dir("cache");
  auto base = dir.path() / "f";
  {
    MapFiles files;
    auto f = open_file(base, 4096);
    require_ok(f->write_fetched(0, fetched(0, 4096)));
    require_ok(f->flush());
  }
  // The data file goes behind the cache's back; a new one is written but its
  // map never flushed (a crash).
  fs::remove(data_of(base));
  {
    auto f = open_file(base, 4096);
    CHECK(f->present_set().empty());
    require_ok(f->write_fetched(100, fetched(100, 10)));
    CHECK_FALSE(fs::exists(map_of(base)));
  }
  auto f = open_file(base, 4096);
  CHECK(f->present_set().empty());
  check_claims(*f);
}
