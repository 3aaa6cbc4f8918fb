// Real FUSE mounts of the real fixture checkpoint, served from a file://
// source directory the test fills (the SFTP variants are in
// mount_sftp_test.cc). Run as root with /dev/fuse.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <fmt/core.h>
#include <algorithm>
#include <catch2/catch.hpp>
#include <csignal>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>

#include "lazyfs/prepare.h"
#include "mount_fixture.h"
#include "test_util.h"

using namespace lazyfs;
using namespace lazyfs::test;

namespace {

constexpr uint64_t kBlock = 128 << 10;
const std::string kBig = "/srv/lazyfs-fixture-a/data/big.bin";

struct FileRig {
  ScratchDir dir{"mount"};
  std::filesystem::path images = dir.path() / "images";
  std::filesystem::path source = dir.path() / "source";
  std::filesystem::path mnt = dir.path() / "mnt";
  std::filesystem::path cache = dir.path() / "cache";
  Catalog catalog;
  std::unique_ptr<LazyfsMount> mount;

  explicit FileRig(std::vector<std::string> extra = {}) : catalog(load()) {
    populate_source(catalog, source);
    start(std::move(extra));
  }
  Catalog load() {
    copy_fixture(images);
    return Catalog::load(images);
  }
  void start(std::vector<std::string> extra = {}) {
    extra.insert(extra.begin(), {"--cache-dir", cache.string()});
    mount = std::make_unique<LazyfsMount>(mnt, images, "file://" + source.string(), extra);
  }
  std::string at(const std::string& p) const { return mount->at(p).string(); }
  uint64_t fetched(const std::string& path) {
    const auto st = mount->status();
    for (const auto& f : st["files"]) {
      if (f["path"] == path) return f["fetched_bytes"].get<uint64_t>();
    }
    FAIL("no status for " << path);
    return 0;
  }
};

std::vector<uint8_t> pread_bytes(int fd, uint64_t off, size_t len) {
  std::vector<uint8_t> buf(len);
  ssize_t n = ::pread(fd, buf.data(), len, static_cast<off_t>(off));
  buf.resize(n < 0 ? 0 : static_cast<size_t>(n));
  return buf;
}

}  // namespace

TEST_CASE("every served file reads byte-identical and stats as recorded", "[mount]") {
  FileRig rig;
  for (const auto& f : rig.catalog.files()) {
    INFO(f.path);
    struct stat st;
    REQUIRE(::stat(rig.at(f.path).c_str(), &st) == 0);
    CHECK(st.st_mode == *f.mode);
    const uint64_t size = f.size.value_or(kAppendSize);
    CHECK(static_cast<uint64_t>(st.st_size) == size);
    CHECK(read_file(rig.at(f.path)) == file_bytes(f));
  }
  // Recorded directories appear with their mode; parents are made up.
  struct stat st;
  REQUIRE(::stat(rig.at("/srv/lazyfs-fixture-a/work").c_str(), &st) == 0);
  CHECK(st.st_mode == (S_IFDIR | 0755));
  CHECK(::stat(rig.at("/srv/lazyfs-fixture-a/tmp/deleted.bin").c_str(), &st) == -1);
  CHECK(errno == ENOENT);
  CHECK(::stat(rig.at("/dev/null").c_str(), &st) == -1);
  CHECK(rig.mount->stop());
}

TEST_CASE("only the blocks read are fetched", "[mount]") {
  FileRig rig;
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);  // no kernel read-ahead
  for (uint64_t b : std::initializer_list<uint64_t>{3, 17, 90, 95, 127}) {
    CHECK(pread_bytes(fd, b * kBlock + 1000, 4096) == source_bytes(kBig, b * kBlock + 1000, 4096));
  }
  ::close(fd);
  CHECK(rig.fetched(kBig) == 5 * kBlock);
  char value[64] = {};
  ssize_t n = ::getxattr(rig.at(kBig).c_str(), "user.lazyfs.fetched_bytes", value, sizeof value);
  REQUIRE(n > 0);
  CHECK(std::string(value, static_cast<size_t>(n)) == std::to_string(5 * kBlock));
  auto st = rig.mount->status();
  CHECK(st["total_bytes"].get<uint64_t>() >= rig.catalog.total_bytes());
  CHECK(st["source"]["state"] == "connected");
}

TEST_CASE("user.lazyfs.complete says 1 once the whole file is local and on disk", "[mount]") {
  FileRig rig;
  const auto complete = [&] {
    char value[8] = {};
    ssize_t n = ::getxattr(rig.at(kBig).c_str(), "user.lazyfs.complete", value, sizeof value);
    return n > 0 ? std::string(value, static_cast<size_t>(n)) : std::string("error");
  };
  CHECK(complete() == "0");
  const uint64_t size = 16 << 20;
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  CHECK(pread_bytes(fd, 0, size) == source_bytes(kBig, 0, size));
  ::close(fd);
  // The map on disk catches up at the next timed flush (every second).
  bool done = false;
  for (int i = 0; i < 100 && !done; ++i) {
    done = complete() == "1";
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(done);
}

TEST_CASE("concurrent random reads and mmap reads are byte-identical", "[mount]") {
  FileRig rig;
  const uint64_t size = 16 << 20;
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t));
      int fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
      for (int i = 0; i < 100; ++i) {
        uint64_t off = rng() % size;
        size_t len = 1 + rng() % (300 << 10);
        auto got = pread_bytes(fd, off, len);
        if (got != source_bytes(kBig, off, std::min<uint64_t>(len, size - off))) ++bad;
      }
      ::close(fd);
    });
  }
  for (auto& t : threads) t.join();
  CHECK(bad == 0);

  const std::string mapped = "/srv/lazyfs-fixture-a/data/mapped.bin";
  int fd = ::open(rig.at(mapped).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  const size_t len = 4 << 20;
  auto* p = static_cast<const uint8_t*>(::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0));
  REQUIRE(p != MAP_FAILED);
  std::mt19937_64 rng(7);
  for (int i = 0; i < 200; ++i) {
    uint64_t off = rng() % len;
    if (p[off] != source_byte(mapped, off)) FAIL("mmap byte " << off);
  }
  ::munmap(const_cast<uint8_t*>(p), len);
  ::close(fd);
}

TEST_CASE("writes into unfetched blocks: partial waits for the block, whole needs no fetch",
          "[mount]") {
  FileRig rig;
  int fd = ::open(rig.at(kBig).c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
  // Whole block 10: nothing fetched.
  std::vector<uint8_t> whole(kBlock, 0xab);
  REQUIRE(::pwrite(fd, whole.data(), whole.size(), 10 * kBlock) == static_cast<ssize_t>(kBlock));
  CHECK(rig.fetched(kBig) == 0);
  // Part of block 20: the block is fetched first, the rest of it kept.
  const std::string text = "local bytes";
  REQUIRE(::pwrite(fd, text.data(), text.size(), 20 * kBlock + 500) ==
          static_cast<ssize_t>(text.size()));
  CHECK(rig.fetched(kBig) == kBlock);
  auto block = pread_bytes(fd, 20 * kBlock, kBlock);
  auto expected = source_bytes(kBig, 20 * kBlock, kBlock);
  std::memcpy(expected.data() + 500, text.data(), text.size());
  CHECK(block == expected);
  CHECK(pread_bytes(fd, 10 * kBlock, kBlock) == whole);
  CHECK(rig.fetched(kBig) == kBlock);
  ::close(fd);

  // Written bytes outlive a restart of the daemon (the cache map is flushed).
  REQUIRE(rig.mount->stop());
  rig.start();
  fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
  CHECK(pread_bytes(fd, 20 * kBlock, kBlock) == expected);
  CHECK(pread_bytes(fd, 10 * kBlock, kBlock) == whole);
  ::close(fd);
  CHECK(rig.fetched(kBig) == 0);
}

TEST_CASE("truncate and extend are local", "[mount]") {
  FileRig rig;
  const auto file = rig.at(kBig);
  REQUIRE(::truncate(file.c_str(), 1000) == 0);
  struct stat st;
  REQUIRE(::stat(file.c_str(), &st) == 0);
  CHECK(st.st_size == 1000);
  CHECK(read_file(file) == source_bytes(kBig, 0, 1000));
  REQUIRE(::truncate(file.c_str(), 5000) == 0);
  auto bytes = read_file(file);
  REQUIRE(bytes.size() == 5000);
  CHECK(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 1000) == source_bytes(kBig, 0, 1000));
  CHECK(std::all_of(bytes.begin() + 1000, bytes.end(), [](uint8_t b) { return b == 0; }));
  CHECK(rig.fetched(kBig) == 1000);  // only what is left of the first block
}

TEST_CASE("files and directories made by the restored process are local", "[mount]") {
  FileRig rig;
  const auto dir = rig.at("/srv/lazyfs-fixture-a/work");
  const auto made = dir + "/new.txt";
  {
    int fd = ::open(made.c_str(), O_CREAT | O_RDWR | O_EXCL, 0640);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, "hello", 5) == 5);
    ::close(fd);
  }
  CHECK(read_file(made) == std::vector<uint8_t>{'h', 'e', 'l', 'l', 'o'});
  REQUIRE(::rename(made.c_str(), (dir + "/renamed.txt").c_str()) == 0);
  CHECK(::access(made.c_str(), F_OK) == -1);
  CHECK(read_file(dir + "/renamed.txt").size() == 5);
  REQUIRE(::mkdir((dir + "/sub").c_str(), 0700) == 0);
  REQUIRE(::rename((dir + "/renamed.txt").c_str(), (dir + "/sub/r.txt").c_str()) == 0);
  CHECK(::rmdir((dir + "/sub").c_str()) == -1);
  CHECK(errno == ENOTEMPTY);
  REQUIRE(::unlink((dir + "/sub/r.txt").c_str()) == 0);
  REQUIRE(::rmdir((dir + "/sub").c_str()) == 0);
  // A served file can be renamed and removed too; the source is untouched.
  const auto counter = rig.at("/srv/lazyfs-fixture-a/state/counter.db");
  REQUIRE(::rename(counter.c_str(), (dir + "/counter.moved").c_str()) == 0);
  CHECK(read_file(dir + "/counter.moved") ==
        source_bytes("/srv/lazyfs-fixture-a/state/counter.db", 0, 8192));
  REQUIRE(::unlink((dir + "/counter.moved").c_str()) == 0);
  CHECK(std::filesystem::exists(rig.source / "srv/lazyfs-fixture-a/state/counter.db"));
  // chmod is local and kept.
  REQUIRE(::chmod(rig.at(kBig).c_str(), 0600) == 0);
  struct stat st;
  REQUIRE(::stat(rig.at(kBig).c_str(), &st) == 0);
  CHECK(st.st_mode == (S_IFREG | 0600));
}

TEST_CASE("a read-only mount refuses changes with EROFS", "[mount]") {
  FileRig rig({"--read-only"});
  CHECK(::open(rig.at(kBig).c_str(), O_RDWR) == -1);
  CHECK(errno == EROFS);
  CHECK(::mkdir(rig.at("/srv/x").c_str(), 0700) == -1);
  CHECK(errno == EROFS);
  CHECK(read_file(rig.at("/srv/lazyfs-fixture-a/state/counter.db")).size() == 8192);
}

TEST_CASE("a file changed on the source is stale: EIO, never other bytes", "[mount]") {
  FileRig rig;
  const std::string counter = "/srv/lazyfs-fixture-a/state/counter.db";
  // Files are checked against the source when the mount starts.
  REQUIRE(rig.mount->stop());
  std::filesystem::resize_file(rig.source.string() + counter, 9000);
  rig.start();
  int fd = ::open(rig.at(counter).c_str(), O_RDONLY);
  CHECK(fd == -1);
  CHECK(errno == EIO);
  struct stat st;
  CHECK(::stat(rig.at(counter).c_str(), &st) == 0);  // still listed, as recorded
  CHECK(st.st_size == 8192);
}

TEST_CASE("compat names show each file under its LazyFS flat name too", "[mount]") {
  FileRig rig({"--compat-names"});
  CHECK(read_file(rig.at("/srv.lazyfs-fixture-a.data.big.bin")) == source_bytes(kBig, 0, 16 << 20));
}

TEST_CASE("lazyfs prepare + the restore-like reader open every file through the mount",
          "[mount][prepare]") {
  FileRig rig;
  auto r = prepare_checkpoint(rig.images, {rig.mnt.string(), true});
  CHECK(r.files_redirected == rig.catalog.files().size());
  auto out =
      run_program(std::string(LAZYFS_BIN_DIR) + "/lazyfs-restore-like", {rig.images.string()});
  INFO(out.err);
  CHECK(out.status == 0);
  CHECK_THAT(out.out, Catch::Contains("0 problems"));
}

TEST_CASE("mount errors: missing or busy mount point, bad checkpoint, bad source", "[mount]") {
  ScratchDir dir("mnterr");
  copy_fixture(dir.path() / "images");
  const auto images = (dir.path() / "images").string();
  std::filesystem::create_directories(dir.path() / "src");
  const auto src = "file://" + (dir.path() / "src").string();
  auto r = run_lazyfs({"mount", (dir.path() / "nope").string(), images, src});
  CHECK(r.status == 2);
  CHECK_THAT(r.err, Catch::Contains("nope: No such file or directory"));
  std::filesystem::create_directories(dir.path() / "mnt");
  r = run_lazyfs({"mount", (dir.path() / "mnt").string(), "/nonexistent", src});
  CHECK(r.status == 2);
  CHECK_THAT(r.err, Catch::Contains("checkpoint directory does not exist"));
  r = run_lazyfs({"mount", (dir.path() / "mnt").string(), images, "file:///nonexistent"});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains("/nonexistent is not a directory"));
  r = run_lazyfs({"mount", "--block-size", "3000", (dir.path() / "mnt").string(), images, src});
  CHECK(r.status == 2);
  {
    LazyfsMount m(dir.path() / "mnt", images, src, {"--cache-dir", (dir.path() / "c").string()});
    r = run_lazyfs({"mount", (dir.path() / "mnt").string(), images, src});
    CHECK(r.status == 2);
    CHECK_THAT(r.err, Catch::Contains("busy"));
  }
}

TEST_CASE("a stale mount left by a killed daemon is replaced", "[mount]") {
  FileRig rig;
  ::kill(rig.mount->pid(), SIGKILL);
  ::waitpid(rig.mount->pid(), nullptr, 0);
  struct stat st;
  CHECK(::stat(rig.mnt.c_str(), &st) == -1);
  CHECK(errno == ENOTCONN);
  rig.start();
  CHECK(read_file(rig.at("/srv/lazyfs-fixture-a/state/counter.db")).size() == 8192);
}

TEST_CASE("the original three-argument form mounts", "[mount]") {
  ScratchDir dir("three");
  copy_fixture(dir.path() / "images");
  auto cat = Catalog::load(dir.path() / "images");
  populate_source(cat, dir.path() / "src");
  std::filesystem::create_directories(dir.path() / "mnt");
  ::setenv("LAZYFS_CACHE_DIR", (dir.path() / "cache").c_str(), 1);
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);  // to reap the detached daemon
  auto r = run_lazyfs({(dir.path() / "mnt").string(), (dir.path() / "images").string(),
                       "file://" + (dir.path() / "src").string()});
  REQUIRE(r.status == 0);
  CHECK(read_file(dir.path().string() + "/mnt" + kBig).size() == 16u << 20);
  auto st = run_lazyfs({"status", (dir.path() / "mnt").string()});
  CHECK(st.status == 0);
  CHECK_THAT(st.out, Catch::Contains("big.bin"));
  auto json =
      nlohmann::json::parse(run_lazyfs({"status", "--json", (dir.path() / "mnt").string()}).out);
  CHECK(json["files"].size() >= 1);
  // --no-files: the same totals without the per-file list.
  auto brief = nlohmann::json::parse(
      run_lazyfs({"status", "--json", "--no-files", (dir.path() / "mnt").string()}).out);
  CHECK_FALSE(brief.contains("files"));
  CHECK(brief["total_bytes"] == json["total_bytes"]);
  CHECK(brief["present_bytes"] == json["present_bytes"]);
  CHECK(brief["pid"] == json["pid"]);
  auto plain = run_lazyfs({"status", "--no-files", (dir.path() / "mnt").string()});
  CHECK(plain.status == 0);
  CHECK_THAT(plain.out, !Catch::Contains("big.bin") && Catch::Contains("total"));
  ::kill(json["pid"].get<pid_t>(), SIGTERM);
  std::error_code ec;
  for (int i = 0; i < 100 && is_mounted(dir.path() / "mnt"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK_FALSE(std::filesystem::exists(dir.path().string() + "/mnt" + kBig, ec));
  ::waitpid(json["pid"].get<pid_t>(), nullptr, 0);
  ::unsetenv("LAZYFS_CACHE_DIR");
}

TEST_CASE("the daemon's --log-file lines carry millisecond times and the daemon's pid", "[mount]") {
  ScratchDir dir("logfile");
  const auto log = dir.path() / "lazyfs.log";
  pid_t pid = 0;
  {
    FileRig rig({"--log-file", log.string()});
    pid = rig.mount->pid();
    CHECK(read_file(rig.at("/srv/lazyfs-fixture-a/state/counter.db")).size() == 8192);
    CHECK(rig.mount->stop());
  }
  std::ifstream in(log);
  std::string line;
  size_t lines = 0;
  bool mounted = false;
  while (std::getline(in, line)) {
    ++lines;
    // Start-up lines too, logged before the detached daemon's stderr
    // became the log file.
    mounted = mounted || line.find(" info mount: mounted ") != std::string::npos;
    // 2026-11-26T13:07:23.701 [4242] info mount: unmounted ...: the
    // daemons of one cache directory share its default log file.
    CHECK_THAT(
        line,
        Catch::Matches(fmt::format(
            R"(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}} \[{}\] (debug|info|warn|error) \S+: .+)",
            pid)));
  }
  CHECK(lines >= 2);
  CHECK(mounted);
}

TEST_CASE("a detached mount logs from its start, and warnings reach the terminal too", "[mount]") {
  ScratchDir dir("logstart");
  const auto images = dir.path() / "images";
  const auto source = dir.path() / "source";
  const auto mnt = dir.path() / "mnt";
  // The default log file, in a cache directory that does not exist yet and
  // must still come out private.
  const auto cache = dir.path() / "new" / "cache";
  copy_fixture(images);
  populate_source(Catalog::load(images), source);
  const auto trace = dir.path() / "app.trace";
  std::ofstream(trace) << "lazyfs-trace 1\n0 4096 /not/in/the/checkpoint\n0 4096 " << kBig << "\n";
  std::filesystem::create_directories(mnt);
  auto r = run_lazyfs({"mount", "--cache-dir", cache.string(), "--prefetch", trace.string(),
                       mnt.string(), images.string(), "file://" + source.string()});
  REQUIRE(r.status == 0);
  auto st = nlohmann::json::parse(run_lazyfs({"status", "--json", mnt.string()}).out);
  const auto pid = st["pid"].get<pid_t>();
  // The one warning, and no info lines.
  CHECK_THAT(r.err, Catch::Contains("warn prefetch: skipping path=/not/in/the/checkpoint"));
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(read_file(mnt.string() + kBig).size() > 0);
  ::kill(pid, SIGTERM);
  for (int i = 0; i < 200 && (::kill(pid, 0) == 0 || is_mounted(mnt)); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK_FALSE(is_mounted(mnt));
  struct stat cst;
  REQUIRE(::stat(cache.c_str(), &cst) == 0);
  CHECK((cst.st_mode & 0777) == 0700);
  std::ifstream in(cache / "lazyfs.log");
  const std::string log{std::istreambuf_iterator<char>(in), {}};
  CHECK_THAT(log, Catch::Contains("warn prefetch: skipping path=/not/in/the/checkpoint"));
  CHECK_THAT(log, Catch::Contains("info mount: mounted "));
  CHECK_THAT(log, Catch::Contains("info mount: unmounted "));
}

TEST_CASE("the daemon raises its soft open-file limit to the hard one", "[mount]") {
  ScratchDir dir("limit");
  const auto images = dir.path() / "images";
  copy_fixture(images);
  populate_source(Catalog::load(images), dir.path() / "source");
  LazyfsMount mount(dir.path() / "mnt", images, "file://" + (dir.path() / "source").string(),
                    {"--cache-dir", (dir.path() / "cache").string()},
                    {"prlimit", "--nofile=128:4096", "--"});
  rlimit rl{};
  REQUIRE(::prlimit(mount.pid(), RLIMIT_NOFILE, nullptr, &rl) == 0);
  CHECK(rl.rlim_cur == 4096);
}

TEST_CASE("files made in the mount may outnumber the descriptors the daemon may hold", "[mount]") {
  ScratchDir dir("manymade");
  const auto images = dir.path() / "images";
  const auto source = dir.path() / "source";
  copy_fixture(images);
  populate_source(Catalog::load(images), source);
  // At most 64 descriptors: the daemon keeps 16 of its files made here open
  // (a quarter of the limit) and reopens the others when they are used.
  constexpr int kFiles = 400;
  LazyfsMount mount(dir.path() / "mnt", images, "file://" + source.string(),
                    {"--cache-dir", (dir.path() / "cache").string()},
                    {"prlimit", "--nofile=64:64", "--"});
  const auto work = mount.at("/srv/lazyfs-fixture-a/work");
  const auto name = [&](int i) { return fmt::format("{}/made-{:03}.txt", work.string(), i); };
  const auto daemon_fds = [&] {
    const auto fd_dir = fmt::format("/proc/{}/fd", mount.pid());
    return std::distance(std::filesystem::directory_iterator(fd_dir),
                         std::filesystem::directory_iterator());
  };
  for (int i = 0; i < kFiles; ++i) {
    int fd = ::open(name(i).c_str(), O_CREAT | O_WRONLY | O_EXCL, 0644);
    INFO(name(i) << ": " << std::strerror(errno));
    REQUIRE(fd >= 0);
    const auto text = std::string(static_cast<size_t>(i + 1), static_cast<char>('a' + i % 26));
    CHECK(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
    ::close(fd);
  }
  CHECK(daemon_fds() < 64);
  // Every one reads back whole, sizes and bytes, the first ones long closed.
  for (int i = 0; i < kFiles; ++i) {
    INFO(name(i));
    CHECK(std::filesystem::file_size(name(i)) == static_cast<uintmax_t>(i + 1));
    const auto bytes = read_file(name(i));
    CHECK(bytes ==
          std::vector<uint8_t>(static_cast<size_t>(i + 1), static_cast<uint8_t>('a' + i % 26)));
  }
  // Appending to a closed one, and truncating another.
  {
    std::ofstream(name(0), std::ios::app) << "z";
    CHECK(read_file(name(0)) == std::vector<uint8_t>{'a', 'z'});
    std::filesystem::resize_file(name(1), 1);
    CHECK(std::filesystem::file_size(name(1)) == 1);
  }
  CHECK(mount.status()["errors"] == 0);
  // The backing files go with the files.
  const auto local = dir.path() / "cache" / "local";
  const auto backing = [&] {
    size_t n = 0;
    for (const auto& e : std::filesystem::recursive_directory_iterator(local)) {
      n += e.is_regular_file();
    }
    return n;
  };
  CHECK(backing() == kFiles);
  for (int i = 0; i < kFiles; ++i) std::filesystem::remove(name(i));
  CHECK(eventually([&] { return backing() == 0; }));
}

TEST_CASE("a detached mount whose log file cannot be opened fails with one line", "[mount]") {
  ScratchDir dir("badlog");
  const auto images = dir.path() / "images";
  const auto mnt = dir.path() / "mnt";
  copy_fixture(images);
  populate_source(Catalog::load(images), dir.path() / "source");
  std::filesystem::create_directories(mnt);
  std::ofstream(dir.path() / "plain") << "a file, not a directory\n";
  const auto log = dir.path() / "plain" / "lazyfs.log";
  auto r = run_lazyfs({"mount", "--cache-dir", (dir.path() / "cache").string(), "--log-file",
                       log.string(), mnt.string(), images.string(),
                       "file://" + (dir.path() / "source").string()});
  CHECK(r.status == 1);
  CHECK(r.err == "lazyfs: cannot open log file " + log.string() + "\n");
  CHECK_FALSE(is_mounted(mnt));
}

TEST_CASE("a second mount of a checkpoint on the same cache dir is refused while one runs",
          "[mount]") {
  ScratchDir dir("twice");
  const auto images = dir.path() / "images";
  const auto cache = (dir.path() / "cache").string();
  const auto src = "file://" + (dir.path() / "source").string();
  copy_fixture(images);
  populate_source(Catalog::load(images), dir.path() / "source");
  const auto second = dir.path() / "mnt2";
  std::filesystem::create_directories(second);
  {
    LazyfsMount first(dir.path() / "mnt", images, src, {"--cache-dir", cache});
    auto r = run_lazyfs({"mount", "--cache-dir", cache, second.string(), images.string(), src});
    CHECK(r.status == 1);
    CHECK(r.err == fmt::format("lazyfs: cache dir {} is in use for this checkpoint by another "
                               "lazyfs (pid {}); give each mount of it its own --cache-dir\n",
                               cache, first.pid()));
    CHECK_FALSE(is_mounted(second));
    CHECK(read_file(first.at("/srv/lazyfs-fixture-a/state/counter.db")).size() == 8192);
    CHECK(first.status()["errors"] == 0);
  }
  // Once the first is gone, the cache is free again.
  LazyfsMount again(second, images, src, {"--cache-dir", cache});
  CHECK(read_file(again.at("/srv/lazyfs-fixture-a/state/counter.db")).size() == 8192);
}
