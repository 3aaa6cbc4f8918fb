// HttpSource against a real nginx on 127.0.0.1 (see nginx_fixture.h):
// byte-exact ranges, stat, the keep-alive pool, a server that ignores Range,
// a file that changes under us, a server that goes away or hangs, HTTP
// errors, start-up errors, and HTTPS with a self-signed certificate.
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <fmt/core.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <future>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

#include "lazyfs/http_source.h"
#include "nginx_fixture.h"
#include "test_util.h"

using namespace lazyfs;
using lazyfs::test::HttpServer;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kMiB = 1024 * 1024;

std::vector<uint8_t> make_random_file(const std::filesystem::path& file, size_t size,
                                      uint64_t seed) {
  std::filesystem::create_directories(file.parent_path());
  std::vector<uint8_t> bytes(size);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < size; i += 8) {
    uint64_t v = rng();
    std::memcpy(bytes.data() + i, &v, std::min<size_t>(8, size - i));
  }
  lazyfs::test::write_bytes(file, bytes);
  return bytes;
}

void set_mtime(const std::filesystem::path& file, time_t when) {
  timeval times[2] = {{when, 0}, {when, 0}};
  REQUIRE(::utimes(file.c_str(), times) == 0);
}

HttpOptions options_for(const std::string& base_url) {
  HttpOptions o;
  o.base_url = base_url;
  o.connect_timeout = 2s;
  o.stall_timeout = 2s;
  return o;
}

std::unique_ptr<Source> connect(const HttpOptions& options) {
  Status st;
  auto source = make_http_source(options, st);
  INFO(st.message());
  REQUIRE(st.ok());
  REQUIRE(source);
  return source;
}

// Reads a range, checking that chunks come ascending and contiguous.
struct ReadResult {
  Status status;
  std::vector<uint8_t> data;
  bool in_order = true;
};

ReadResult read_range(Source& source, const std::string& path, uint64_t offset, uint64_t length) {
  ReadResult r;
  uint64_t next = offset;
  r.status = source.read(path, offset, length, [&](uint64_t at, std::span<const std::byte> data) {
    if (at != next || data.empty()) r.in_order = false;
    const auto* p = reinterpret_cast<const uint8_t*>(data.data());
    r.data.insert(r.data.end(), p, p + data.size());
    next = at + data.size();
  });
  return r;
}

std::vector<uint8_t> expected_slice(const std::vector<uint8_t>& file, uint64_t offset,
                                    uint64_t length) {
  if (offset >= file.size()) return {};
  auto end = std::min<uint64_t>(file.size(), offset + length);
  return {file.begin() + static_cast<ptrdiff_t>(offset),
          file.begin() + static_cast<ptrdiff_t>(end)};
}

}  // namespace

TEST_CASE("http source: ranges of a 32 MiB file are byte-identical, also at and past EOF",
          "[http]") {
  HttpServer server;
  const auto file = make_random_file(server.docroot() / "ckpt/data/big.bin", 32 * kMiB, 1);
  const std::string odd_name = "/dir with spaces/a file+%?#&;=é.bin";
  const auto odd = make_random_file(server.docroot().string() + "/ckpt" + odd_name, 100000, 2);
  auto source = connect(options_for(server.url("/ckpt")));
  CHECK(source->describe() == server.url("/ckpt"));

  std::mt19937_64 rng(42);
  for (int i = 0; i < 60; ++i) {
    const uint64_t off = rng() % file.size();
    const uint64_t len = 1 + rng() % (2 * kMiB);
    INFO("off=" << off << " len=" << len);
    auto r = read_range(*source, "/data/big.bin", off, len);
    REQUIRE(r.status.ok());
    CHECK(r.in_order);
    CHECK(r.data == expected_slice(file, off, len));
  }
  const uint64_t size = file.size();
  struct Case {
    uint64_t off, len;
  };
  for (auto c : {Case{0, size}, Case{size - 1, 1}, Case{size - 4096, 4096},
                 Case{size - 1000, 1 << 20}, Case{size, 4096}, Case{size + 12345, 10}}) {
    INFO("off=" << c.off << " len=" << c.len);
    auto r = read_range(*source, "/data/big.bin", c.off, c.len);
    REQUIRE(r.status.ok());
    CHECK(r.in_order);
    CHECK(r.data == expected_slice(file, c.off, c.len));
  }

  // Spaces and reserved characters in a path are percent-encoded.
  auto r = read_range(*source, odd_name, 5000, 200000);
  INFO(r.status.message());
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(odd, 5000, 200000));
  bool encoded = false;
  for (const auto& req : server.requests()) {
    if (req.uri == "/ckpt/dir%20with%20spaces/a%20file%2B%25%3F%23%26%3B%3D%C3%A9.bin") {
      encoded = true;
      CHECK(req.status == 206);
    }
  }
  CHECK(encoded);
  CHECK(source->counters().bytes_read.load() > 0);
}

TEST_CASE("http source: stat gives size and mtime, 404 and 403 are permanent", "[http]") {
  HttpServer server;
  const auto file = server.docroot() / "f.bin";
  make_random_file(file, 123457, 3);
  set_mtime(file, 1700000000);
  std::filesystem::create_directories(server.docroot() / "adir");
  auto source = connect(options_for(server.url()));
  CHECK(source->describe() == server.url("/"));

  SourceStat st;
  auto s = source->stat("/f.bin", st);
  REQUIRE(s.ok());
  CHECK(st.size == 123457);
  CHECK(st.mode == (S_IFREG | 0444));
  CHECK(st.mtime == 1700000000);

  s = source->stat("/missing.bin", st);
  CHECK(s.errnum() == ENOENT);
  CHECK_FALSE(s.retryable());
  CHECK_THAT(s.message(), Catch::Contains("/missing.bin") && Catch::Contains("404"));
  auto r = read_range(*source, "/missing.bin", 0, 10);
  CHECK(r.status.errnum() == ENOENT);
  CHECK_FALSE(r.status.retryable());
  CHECK(r.data.empty());
  // A directory: nginx redirects to "adir/", which it refuses to list.
  s = source->stat("/adir", st);
  CHECK(s.errnum() == EACCES);
  CHECK_FALSE(s.retryable());

  // stat_many answers every path once, on the calling thread.
  std::vector<std::string> paths;
  for (int i = 0; i < 20; ++i) {
    const auto name = fmt::format("/many/{}.bin", i);
    make_random_file(server.docroot().string() + name, static_cast<size_t>(1000 + i), 4);
    paths.push_back(name);
  }
  paths.push_back("/many/absent.bin");
  std::vector<int> answers(paths.size(), 0);
  const auto self = std::this_thread::get_id();
  bool same_thread = true;
  source->stat_many(paths, [&](size_t i, const Status& status, const SourceStat& got) {
    ++answers[i];
    same_thread = same_thread && std::this_thread::get_id() == self;
    if (i + 1 < paths.size()) {
      CHECK(status.ok());
      CHECK(got.size == 1000 + i);
    } else {
      CHECK(status.errnum() == ENOENT);
    }
  });
  CHECK(same_thread);
  CHECK(std::all_of(answers.begin(), answers.end(), [](int n) { return n == 1; }));
}

TEST_CASE("http source: 200 reads from 4 threads keep to 4 keep-alive connections", "[http]") {
  HttpServer server;
  const auto file = make_random_file(server.docroot() / "big.bin", 8 * kMiB, 5);
  auto o = options_for(server.url());
  o.connections = 4;
  auto source = connect(o);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t));
      for (int i = 0; i < 50; ++i) {
        const uint64_t off = rng() % file.size();
        const uint64_t len = 1 + rng() % (256 << 10);
        auto r = read_range(*source, "/big.bin", off, len);
        if (!r.status.ok() || r.data != expected_slice(file, off, len)) ++bad;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(bad == 0);
  CHECK(source->counters().reads.load() == 200);
  CHECK(source->counters().connects.load() <= 4);
  REQUIRE(server.wait_for_requests(201, 5s));  // and make_http_source's HEAD
  std::set<uint64_t> connections;
  for (const auto& r : server.requests()) connections.insert(r.connection);
  CHECK(connections.size() <= 4);
  CHECK(source->state() == SourceState::kConnected);
}

TEST_CASE("http source: a server that ignores Range is refused before it sends the file",
          "[http]") {
  HttpServer server;
  const auto big = make_random_file(server.docroot() / "big.bin", 32 * kMiB, 6);
  const auto small = make_random_file(server.docroot() / "small.bin", 5000, 7);
  auto source = connect(options_for(server.url("/norange")));

  SourceStat st;
  REQUIRE(source->stat("/big.bin", st).ok());
  CHECK(st.size == big.size());
  const auto before = server.requests().size();
  auto r = read_range(*source, "/big.bin", 4 * kMiB, 128 << 10);
  CHECK(r.status.errnum() == EOPNOTSUPP);
  CHECK_FALSE(r.status.retryable());
  CHECK_THAT(r.status.message(), Catch::Contains(server.url()) &&
                                     Catch::Contains("ignores Range requests") &&
                                     Catch::Contains("refusing to download whole files"));
  CHECK(r.data.empty());
  CHECK(source->counters().bytes_read.load() == 0);
  // nginx logs what it sent before we hung up: far from the whole file.
  REQUIRE(server.wait_for_requests(before + 1, 10s));
  const auto logged = server.requests().back();
  CHECK(logged.status == 200);
  CHECK(logged.range == "bytes=4194304-4325375");
  INFO("nginx sent " << logged.body_bytes_sent << " bytes of " << big.size());
  CHECK(logged.body_bytes_sent < big.size() / 2);

  // A file no longer than the range asked from 0 is exactly what was asked.
  r = read_range(*source, "/small.bin", 0, 128 << 10);
  REQUIRE(r.status.ok());
  CHECK(r.data == small);
  // The source still works for the next request.
  r = read_range(*source, "/big.bin", 0, 10);
  CHECK(r.status.errnum() == EOPNOTSUPP);
}

TEST_CASE("http source: a file changed on the server after stat is refused", "[http]") {
  HttpServer server;
  const auto path = server.docroot() / "f.bin";
  const auto first = make_random_file(path, 2 * kMiB, 8);
  set_mtime(path, 1700000000);
  auto source = connect(options_for(server.url()));
  SourceStat st;
  REQUIRE(source->stat("/f.bin", st).ok());
  auto r = read_range(*source, "/f.bin", 1000, 5000);
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(first, 1000, 5000));

  // Same size, new content and mtime: a new ETag.
  make_random_file(path, 2 * kMiB, 9);
  set_mtime(path, 1700000100);
  r = read_range(*source, "/f.bin", 1000, 5000);
  CHECK(r.status.errnum() == ESTALE);
  CHECK_FALSE(r.status.retryable());
  CHECK_THAT(r.status.message(), Catch::Contains("/f.bin") &&
                                     Catch::Contains("changed on the server (") &&
                                     Catch::Contains("ETag"));
  CHECK(r.data.empty());
  // Every later read too, while a fresh source serves the new file.
  CHECK(read_range(*source, "/f.bin", 0, 10).status.errnum() == ESTALE);
  auto fresh = connect(options_for(server.url()));
  REQUIRE(fresh->stat("/f.bin", st).ok());
  CHECK(read_range(*fresh, "/f.bin", 0, 10).status.ok());
}

TEST_CASE("http source: a stopped server fails fast and transiently, then reads recover",
          "[http]") {
  HttpServer server;
  const auto file = make_random_file(server.docroot() / "f.bin", 4 * kMiB, 10);
  auto source = connect(options_for(server.url()));
  REQUIRE(read_range(*source, "/f.bin", 0, 4096).status.ok());

  server.stop();
  auto t0 = std::chrono::steady_clock::now();
  auto r = read_range(*source, "/f.bin", kMiB, 4096);
  CHECK(std::chrono::steady_clock::now() - t0 < 3s);  // the stall time-out is 2 s
  CHECK_FALSE(r.status.ok());
  CHECK(r.status.retryable());
  CHECK_THAT(r.status.message(), Catch::Contains("127.0.0.1"));
  CHECK(source->state() == SourceState::kDown);
  CHECK(source->counters().connect_failures.load() >= 1);

  server.start();
  r = read_range(*source, "/f.bin", kMiB, 4096);
  INFO(r.status.message());
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(file, kMiB, 4096));
  CHECK(source->state() == SourceState::kConnected);
}

TEST_CASE("http source: a hung server fails within the stall time-out, then recovers", "[http]") {
  HttpServer server;
  const auto file = make_random_file(server.docroot() / "f.bin", 4 * kMiB, 11);
  auto source = connect(options_for(server.url()));
  REQUIRE(read_range(*source, "/f.bin", 0, 4096).status.ok());

  server.pause();
  auto t0 = std::chrono::steady_clock::now();
  auto r = read_range(*source, "/f.bin", kMiB, 4096);
  const auto waited = std::chrono::steady_clock::now() - t0;
  server.resume();
  CHECK(r.status.errnum() == ETIMEDOUT);
  CHECK(r.status.retryable());
  CHECK_THAT(r.status.message(), Catch::Contains("no progress for 2000 ms"));
  CHECK(waited >= 2s);
  CHECK(waited < 4s);

  r = read_range(*source, "/f.bin", kMiB, 4096);
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(file, kMiB, 4096));
}

TEST_CASE("http source: cancel ends a read hung on the server, and every later call", "[http]") {
  HttpServer server;
  make_random_file(server.docroot() / "f.bin", 4 * kMiB, 13);
  auto o = options_for(server.url());
  o.stall_timeout = 10s;
  auto source = connect(o);
  REQUIRE(read_range(*source, "/f.bin", 0, 4096).status.ok());

  server.pause();
  auto reader =
      std::async(std::launch::async, [&] { return read_range(*source, "/f.bin", kMiB, 4096); });
  std::this_thread::sleep_for(300ms);
  const auto t0 = std::chrono::steady_clock::now();
  source->cancel();
  REQUIRE(reader.wait_for(5s) == std::future_status::ready);  // not the 10 s stall
  auto r = reader.get();
  server.resume();
  INFO(r.status.message());
  CHECK(r.status.errnum() == ECANCELED);
  CHECK_FALSE(r.status.retryable());
  // At once: the cancel shuts the connection's socket down, where it used to
  // wait for libcurl's next progress call (once a second on a stalled
  // transfer, some 0.7 s after this cancel).
  const double took_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  INFO("cancel took " << took_ms << " ms");
  CHECK(took_ms < 250);
  CHECK(read_range(*source, "/f.bin", 0, 4096).status.errnum() == ECANCELED);
}

TEST_CASE("http source: a throwing sink leaves the source usable", "[http]") {
  HttpServer server;
  const auto file = make_random_file(server.docroot() / "f.bin", 4 * kMiB, 12);
  auto o = options_for(server.url());
  o.connections = 1;
  auto source = connect(o);
  CHECK_THROWS_AS(source->read("/f.bin", 0, 2 * kMiB,
                               [](uint64_t, std::span<const std::byte>) {
                                 throw std::runtime_error("sink full");
                               }),
                  std::runtime_error);
  auto r = read_range(*source, "/f.bin", 100, 100);
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(file, 100, 100));
}

TEST_CASE("http source: bad URLs and an unreachable server are reported at start", "[http]") {
  Status st;
  for (const char* bad : {"ftp://127.0.0.1/x", "http://", "http://127.0.0.1/x?y=1", "not a url"}) {
    INFO(bad);
    CHECK_FALSE(make_http_source(options_for(bad), st));
    CHECK(st.errnum() == EINVAL);
  }

  HttpServer server;
  // Credentials go to the server but never into describe().
  auto source = connect(
      options_for(fmt::format("http://alice:s3cret@127.0.0.1:{}/some%20dir/", server.port())));
  CHECK(source->describe() == server.url("/some%20dir"));
  server.stop();
  CHECK_FALSE(make_http_source(options_for(server.url("/x")), st));
  CHECK_FALSE(st.ok());
  CHECK(st.retryable());
  CHECK_THAT(st.message(), Catch::Contains(server.url()) && Catch::Contains("refused"));
}

TEST_CASE("https source: a self-signed server is trusted through its CA file only", "[http]") {
  HttpServer server(/*tls=*/true);
  const auto file = make_random_file(server.docroot() / "f.bin", 3 * kMiB, 13);

  Status st;
  CHECK_FALSE(make_http_source(options_for(server.tls_url()), st));
  CHECK(st.errnum() == EACCES);
  CHECK_FALSE(st.retryable());
  CHECK_THAT(st.message(), Catch::Contains("certificate") && Catch::Contains(server.tls_url()));

  auto o = options_for(server.tls_url());
  o.ca_file = server.certificate().string();
  auto source = connect(o);
  auto r = read_range(*source, "/f.bin", 12345, kMiB);
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(file, 12345, kMiB));

  o = options_for(server.tls_url());
  o.insecure = true;
  source = connect(o);
  r = read_range(*source, "/f.bin", 0, 100);
  REQUIRE(r.status.ok());
  CHECK(r.data == expected_slice(file, 0, 100));
}
