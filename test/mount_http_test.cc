// Real FUSE mounts served over HTTP from a real nginx on 127.0.0.1:
// byte-identical reads of the fixture checkpoint, and a source that goes
// away and comes back.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <set>

#include "mount_fixture.h"
#include "nginx_fixture.h"
#include "test_util.h"

using namespace lazyfs;
using namespace lazyfs::test;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kBlock = 128 << 10;
const std::string kBig = "/srv/lazyfs-fixture-a/data/big.bin";

struct HttpRig {
  HttpServer nginx;
  ScratchDir dir{"httpmount"};
  std::filesystem::path images = dir.path() / "images";
  std::filesystem::path mnt = dir.path() / "mnt";
  Catalog catalog;
  std::unique_ptr<LazyfsMount> mount;

  // With `tls` the mount goes to nginx's https port, trusting its certificate.
  explicit HttpRig(const std::vector<std::string>& extra = {}, bool tls = false)
      : nginx(tls), catalog(load()) {
    populate_source(catalog, nginx.docroot() / "ckpt");
    std::vector<std::string> args{"--cache-dir", (dir.path() / "cache").string()};
    if (tls) args.insert(args.end(), {"--ca-file", nginx.certificate().string()});
    args.insert(args.end(), extra.begin(), extra.end());
    mount = std::make_unique<LazyfsMount>(mnt, images,
                                          tls ? nginx.tls_url("/ckpt") : nginx.url("/ckpt"), args);
  }
  Catalog load() {
    copy_fixture(images);
    return Catalog::load(images);
  }
  std::string at(const std::string& p) const { return mount->at(p).string(); }
};

std::vector<uint8_t> pread_bytes(int fd, uint64_t off, size_t len, int& err) {
  std::vector<uint8_t> buf(len);
  ssize_t n = ::pread(fd, buf.data(), len, static_cast<off_t>(off));
  err = n < 0 ? errno : 0;
  buf.resize(n < 0 ? 0 : static_cast<size_t>(n));
  return buf;
}

}  // namespace

TEST_CASE("http mount: every served file reads byte-identical", "[mount][http]") {
  HttpRig rig;
  for (const auto& f : rig.catalog.files()) {
    INFO(f.path);
    CHECK(read_file(rig.at(f.path)) == file_bytes(f));
  }
  auto st = rig.mount->status();
  CHECK(st["source"]["uri"] == rig.nginx.url("/ckpt"));
  CHECK(st["source"]["state"] == "connected");
  CHECK(st["source"]["connects"].get<uint64_t>() <= 4);
  CHECK(st["errors"] == 0);
  // Every GET was a ranged one answered with 206, on at most 4 connections,
  // and nginx sent no more body bytes than the mount fetched.
  uint64_t sent = 0;
  std::set<uint64_t> connections;
  for (const auto& r : rig.nginx.requests()) {
    connections.insert(r.connection);
    if (r.method != "GET") continue;
    CHECK(r.status == 206);
    CHECK(r.range != "-");
    sent += r.body_bytes_sent;
  }
  CHECK(connections.size() <= 4);
  CHECK(sent == st["fetched_bytes"].get<uint64_t>());
  CHECK(rig.mount->stop());
}

TEST_CASE("http mount: the mount outlives its server, EIO after the budget, then recovery",
          "[mount][http]") {
  HttpRig rig({"--timeout", "3"});
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
  int err = 0;
  CHECK(pread_bytes(fd, 0, 4096, err) == source_bytes(kBig, 0, 4096));

  rig.nginx.stop();
  const auto t0 = std::chrono::steady_clock::now();
  pread_bytes(fd, 50 * kBlock, 4096, err);
  CHECK(err == EIO);
  CHECK(std::chrono::steady_clock::now() - t0 < 30s);
  CHECK(pread_bytes(fd, 0, 4096, err) == source_bytes(kBig, 0, 4096));  // cached
  CHECK(rig.mount->status()["errors"].get<uint64_t>() >= 1);

  rig.nginx.start();
  CHECK(pread_bytes(fd, 50 * kBlock, 4096, err) == source_bytes(kBig, 50 * kBlock, 4096));
  CHECK(err == 0);
  ::close(fd);
}

TEST_CASE("http mount: an unreachable server fails the mount clearly", "[mount][http]") {
  HttpServer nginx;
  ScratchDir dir("httpbad");
  copy_fixture(dir.path() / "images");
  std::filesystem::create_directories(dir.path() / "mnt");
  nginx.stop();
  auto r = run_lazyfs({"mount", "--cache-dir", (dir.path() / "c").string(),
                       (dir.path() / "mnt").string(), (dir.path() / "images").string(),
                       nginx.url("/ckpt")});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains(nginx.url()) && Catch::Contains("refused"));
}

TEST_CASE("https mount: served through --ca-file, refused without it", "[mount][http]") {
  HttpRig rig({}, true);
  int err = 0;
  int fd = ::open(rig.at(kBig).c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  CHECK(pread_bytes(fd, 7 * kBlock + 5, 9000, err) == source_bytes(kBig, 7 * kBlock + 5, 9000));
  CHECK(err == 0);
  ::close(fd);
  CHECK(rig.mount->stop());

  // The same server without its CA: the certificate is not trusted.
  ScratchDir dir("httpsbad");
  copy_fixture(dir.path() / "images");
  std::filesystem::create_directories(dir.path() / "mnt");
  auto r = run_lazyfs({"mount", "--cache-dir", (dir.path() / "c").string(),
                       (dir.path() / "mnt").string(), (dir.path() / "images").string(),
                       rig.nginx.tls_url("/ckpt")});
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Catch::Contains(rig.nginx.tls_url()) && Catch::Contains("certificate"));
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}
