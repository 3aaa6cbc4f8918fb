// Real FUSE mounts served over SFTP from a real OpenSSH sshd on 127.0.0.1:
// byte-identical reads, a source that goes away and comes back, and a read
// interrupted while it waits on a hung server.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <future>
#include <thread>

#include "mount_fixture.h"
#include "sshd_fixture.h"
#include "test_util.h"

using namespace lazyfs;
using namespace lazyfs::test;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kBlock = 128 << 10;
const std::string kBig = "/srv/lazyfs-fixture-a/data/big.bin";

struct SftpRig {
  SshServer sshd;
  ScratchDir dir{"sftpmount"};
  std::filesystem::path images = dir.path() / "images";
  std::filesystem::path source = dir.path() / "source";
  std::filesystem::path mnt = dir.path() / "mnt";
  Catalog catalog;
  std::unique_ptr<LazyfsMount> mount;

  explicit SftpRig(const std::vector<std::string>& extra = {}) : catalog(load()) {
    populate_source(catalog, source);
    std::vector<std::string> args{"--cache-dir",   (dir.path() / "cache").string(),
                                  "--identity",    sshd.user_key().string(),
                                  "--known-hosts", sshd.known_hosts().string()};
    args.insert(args.end(), extra.begin(), extra.end());
    mount = std::make_unique<LazyfsMount>(
        mnt, images, "sftp://root@127.0.0.1:" + std::to_string(sshd.port()) + source.string(),
        args);
  }
  Catalog load() {
    copy_fixture(images);
    return Catalog::load(images);
  }
  std::string at(const std::string& p) const { return mount->at(p).string(); }
};

std::vector<uint8_t> pread_bytes(int fd, uint64_t off, size_t len, int& err) {
  // Page-aligned, for O_DIRECT.
  auto* mem = static_cast<uint8_t*>(std::aligned_alloc(4096, (len + 4095) / 4096 * 4096));
  ssize_t n = ::pread(fd, mem, len, static_cast<off_t>(off));
  err = n < 0 ? errno : 0;
  std::vector<uint8_t> buf(mem, mem + (n < 0 ? 0 : n));
  std::free(mem);
  return buf;
}

// Live ssh client processes connecting to `port` (by their arguments).
size_t ssh_clients_for(uint16_t port) {
  size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const auto name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(entry.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::string> args;
    for (size_t at = 0; at < cmdline.size();) {
      auto end = cmdline.find('\0', at);
      if (end == std::string::npos) end = cmdline.size();
      args.push_back(cmdline.substr(at, end - at));
      at = end + 1;
    }
    if (args.empty() || std::filesystem::path(args[0]).filename() != "ssh") continue;
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == "-p" && args[i + 1] == std::to_string(port)) ++n;
    }
  }
  return n;
}

}  // namespace

TEST_CASE("over SFTP every served file reads byte-identical", "[mount][sftp]") {
  const bool libssh2 = GENERATE(false, true);
  INFO((libssh2 ? "--ssh-client libssh2" : "OpenSSH's ssh (the default)"));
  SftpRig rig(libssh2 ? std::vector<std::string>{"--ssh-client", "libssh2"}
                      : std::vector<std::string>{});
  for (const auto& f : rig.catalog.files()) {
    INFO(f.path);
    CHECK(read_file(rig.at(f.path)) == file_bytes(f));
  }
  auto st = rig.mount->status();
  CHECK(st["source"]["state"] == "connected");
  CHECK(st["source"]["connects"].get<uint64_t>() <= 4);
  CHECK(st["errors"] == 0);
  // The server read no byte more than the mount fetched.
  CHECK(rig.sshd.wait_for_closes(1, 5s));
  CHECK(rig.sshd.bytes_read() <= st["fetched_bytes"].get<uint64_t>());
  // One ssh per session (at most --connections) with the OpenSSH client,
  // none with libssh2; all gone with the daemon.
  const auto clients = ssh_clients_for(rig.sshd.port());
  if (libssh2) {
    CHECK(clients == 0);
  } else {
    CHECK(clients >= 1);
    CHECK(clients <= 4);
  }
  CHECK(rig.mount->stop());
  CHECK(ssh_clients_for(rig.sshd.port()) == 0);
}

TEST_CASE("the mount outlives its source: EIO after the budget, cached bytes still served",
          "[mount][sftp]") {
  SftpRig rig({"--timeout", "3"});
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
  int err = 0;
  CHECK(pread_bytes(fd, 0, 4096, err) == source_bytes(kBig, 0, 4096));

  rig.sshd.stop();
  const auto t0 = std::chrono::steady_clock::now();
  auto got = pread_bytes(fd, 50 * kBlock, 4096, err);
  const auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(err == EIO);
  CHECK(waited < 30s);  // bounded by --timeout (3 s) plus one stall time-out
  CHECK(pread_bytes(fd, 0, 4096, err) == source_bytes(kBig, 0, 4096));  // cached
  auto st = rig.mount->status();
  CHECK(st["errors"].get<uint64_t>() >= 1);

  rig.sshd.start();
  CHECK(pread_bytes(fd, 50 * kBlock, 4096, err) == source_bytes(kBig, 50 * kBlock, 4096));
  CHECK(err == 0);
  ::close(fd);
}

TEST_CASE("a file rewritten on the source during the mount is refused, never served mixed",
          "[mount][sftp]") {
  SftpRig rig;
  // O_DIRECT: every read reaches lazyfs, none is answered from the page cache.
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY | O_DIRECT);
  REQUIRE(fd >= 0);
  int err = 0;
  CHECK(pread_bytes(fd, 0, 4096, err) == source_bytes(kBig, 0, 4096));
  CHECK(pread_bytes(fd, 8 * kBlock, 4096, err) == source_bytes(kBig, 8 * kBlock, 4096));

  // Rewritten in place: the same size, other bytes, a later mtime.
  const auto src = std::filesystem::path(rig.source.string() + kBig);
  struct stat st {};
  REQUIRE(::stat(src.c_str(), &st) == 0);
  write_bytes(src, std::vector<uint8_t>(static_cast<size_t>(st.st_size), 0x5a));
  const timespec times[2] = {{0, UTIME_OMIT}, {st.st_mtime + 60, 0}};
  REQUIRE(::utimensat(AT_FDCWD, src.c_str(), times, 0) == 0);

  // The next fetch finds the change (on whichever session it runs, with
  // the file's handle kept open or not) and the file is served no more.
  CHECK(pread_bytes(fd, 50 * kBlock, 4096, err).empty());
  CHECK(err == EIO);
  CHECK(pread_bytes(fd, 0, 4096, err).empty());  // cached, of the old version
  CHECK(err == EIO);
  ::close(fd);
  const auto status = rig.mount->status();
  bool stale = false;
  for (const auto& f : status["files"]) {
    if (f["path"] == kBig) stale = f["stale"].get<bool>();
  }
  CHECK(stale);
}

namespace {
void on_usr1(int) {}
}  // namespace

TEST_CASE("a read parked on a hung server is interrupted with EINTR", "[mount][sftp]") {
  SftpRig rig({"--timeout", "60"});
  // O_DIRECT: a read through the page cache waits killably, so only a fatal
  // signal ends it and the kernel sends no FUSE interrupt; a direct read
  // waits interruptibly, and the kernel forwards the signal to lazyfs.
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY | O_DIRECT);
  REQUIRE(fd >= 0);
  struct sigaction sa {};
  sa.sa_handler = on_usr1;  // no SA_RESTART: the read must come back
  ::sigaction(SIGUSR1, &sa, nullptr);
  rig.sshd.pause();
  std::promise<pthread_t> self;
  auto reader = std::async(std::launch::async, [&] {
    self.set_value(::pthread_self());
    int err = 0;
    pread_bytes(fd, 60 * kBlock, 4096, err);
    return err;
  });
  const pthread_t tid = self.get_future().get();
  std::this_thread::sleep_for(500ms);  // let the read reach the daemon and park
  ::pthread_kill(tid, SIGUSR1);
  REQUIRE(reader.wait_for(10s) == std::future_status::ready);
  CHECK(reader.get() == EINTR);
  rig.sshd.resume();
  int err = 0;
  CHECK(pread_bytes(fd, 60 * kBlock, 4096, err) == source_bytes(kBig, 60 * kBlock, 4096));
  ::close(fd);
}

TEST_CASE("stopping the daemon while a fetch hangs on the server does not wait for it",
          "[mount][sftp]") {
  SftpRig rig;  // --timeout 30: a stalled transfer fails after 10 s
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY | O_DIRECT);
  REQUIRE(fd >= 0);
  int err = 0;
  CHECK(pread_bytes(fd, 0, 4096, err) == source_bytes(kBig, 0, 4096));  // sessions are up
  rig.sshd.pause();
  auto reader = std::async(std::launch::async, [&] {
    int e = 0;
    pread_bytes(fd, 60 * kBlock, 4096, e);
    return e;
  });
  std::this_thread::sleep_for(500ms);  // let the fetch go out and hang
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(rig.mount->stop());
  const auto took = std::chrono::steady_clock::now() - t0;
  // The fetch is abandoned, not waited out: well inside the 10 s stall.
  CHECK(took < 5s);
  REQUIRE(reader.wait_for(5s) == std::future_status::ready);
  CHECK(reader.get() == EIO);
  ::close(fd);
  rig.sshd.resume();
}

TEST_CASE("mounting with an unknown host key or an unreachable host fails clearly",
          "[mount][sftp]") {
  SshServer sshd;
  ScratchDir dir("sftpbad");
  copy_fixture(dir.path() / "images");
  std::filesystem::create_directories(dir.path() / "mnt");
  const auto uri = "sftp://root@127.0.0.1:" + std::to_string(sshd.port()) + "/";
  auto r = run_lazyfs({"mount", "--cache-dir", (dir.path() / "c").string(), "--identity",
                       sshd.user_key().string(), "--known-hosts", sshd.wrong_known_hosts().string(),
                       (dir.path() / "mnt").string(), (dir.path() / "images").string(), uri});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains("127.0.0.1") && Catch::Contains("host key"));
  sshd.stop();
  r = run_lazyfs({"mount", "--cache-dir", (dir.path() / "c").string(), "--identity",
                  sshd.user_key().string(), "--known-hosts", sshd.known_hosts().string(),
                  (dir.path() / "mnt").string(), (dir.path() / "images").string(), uri});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains("127.0.0.1") && Catch::Contains("refused"));

  r = run_lazyfs({"mount", "--ssh-client", "putty", (dir.path() / "mnt").string(),
                  (dir.path() / "images").string(), uri});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains("--ssh-client putty: use openssh or libssh2"));
  r = run_lazyfs({"mount", "--cache-dir", (dir.path() / "c").string(), "--ssh-command",
                  "/nonexistent/ssh", (dir.path() / "mnt").string(),
                  (dir.path() / "images").string(), uri});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains("cannot run the ssh client \"/nonexistent/ssh\""));
}
