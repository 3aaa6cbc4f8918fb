// lazyfs-bench-workload: stands in for a restored process. It opens the
// scenario's files at ROOT + their checkpoint path, seeks and reads them as
// the plan says (or maps them and touches pages), and prints on stdout one
// JSON object with CLOCK_MONOTONIC timestamps (comparable with the harness's
// own clock), the bytes it read and their sum, which the harness checks
// against the generator.
//
// With --hold it behaves like a process that is checkpointed and restored by
// CRIU: it opens (and maps) everything first, creates --ready-file, waits for
// --go-file to appear (the harness creates it before `criu restore`, so only
// the restored copy sees it), then reads through the descriptors it already
// holds and writes the JSON to --result-file.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "content.h"
#include "plan.h"

namespace lb = lazyfs::bench;

namespace {

uint64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

struct Opened {
  const lb::PlanStep* step = nullptr;
  int fd = -1;
  const uint8_t* map = nullptr;
  size_t map_size = 0;
};

struct Totals {
  uint64_t start_ns = 0;
  uint64_t first_byte_ns = 0;
  uint64_t bytes = 0;
  uint64_t sum = 0;

  void got(const uint8_t* data, size_t n) {
    if (n == 0) return;
    if (first_byte_ns == 0) first_byte_ns = now_ns();
    bytes += n;
    sum += lb::byte_sum(data, n);
  }
};

[[noreturn]] void fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(fmt::format("{} {}: {}", what, path, std::strerror(errno)));
}

Opened open_step(const lb::PlanStep& step, const std::string& root) {
  Opened o;
  o.step = &step;
  const std::string file = root + step.path;
  o.fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (o.fd < 0) fail("open", file);
  if (step.kind == lb::PlanStep::Kind::kMmap) {
    struct stat st {};
    if (::fstat(o.fd, &st) != 0) fail("fstat", file);
    o.map_size = static_cast<size_t>(st.st_size);
    void* p = ::mmap(nullptr, o.map_size, PROT_READ, MAP_PRIVATE, o.fd, 0);
    if (p == MAP_FAILED) fail("mmap", file);
    o.map = static_cast<const uint8_t*>(p);
  }
  return o;
}

void read_step(const Opened& o, std::vector<uint8_t>& buf, Totals& t) {
  const auto& step = *o.step;
  auto read_some = [&](size_t want) {
    ssize_t n;
    do {
      n = ::read(o.fd, buf.data(), want);
    } while (n < 0 && errno == EINTR);
    if (n < 0) fail("read", step.path);
    return static_cast<size_t>(n);
  };
  switch (step.kind) {
    case lb::PlanStep::Kind::kRanges:
      for (const auto& [off, len] : step.ranges) {
        if (::lseek(o.fd, static_cast<off_t>(off), SEEK_SET) < 0) fail("lseek", step.path);
        uint64_t left = len;
        while (left > 0) {
          if (buf.size() < (1u << 20)) buf.resize(1u << 20);
          size_t n = read_some(static_cast<size_t>(std::min<uint64_t>(left, buf.size())));
          if (n == 0) break;
          t.got(buf.data(), n);
          left -= n;
        }
      }
      break;
    case lb::PlanStep::Kind::kWhole:
      if (buf.size() < step.buffer) buf.resize(step.buffer);
      if (::lseek(o.fd, 0, SEEK_SET) < 0) fail("lseek", step.path);
      for (;;) {
        size_t n = read_some(static_cast<size_t>(step.buffer));
        if (n == 0) break;
        t.got(buf.data(), n);
      }
      break;
    case lb::PlanStep::Kind::kMmap:
      for (const auto& r : step.ranges) {
        if (r.first >= o.map_size) continue;
        // A volatile load: the page fault is the point.
        const uint8_t b = *static_cast<const volatile uint8_t*>(o.map + r.first);
        t.got(&b, 1);
      }
      break;
  }
}

std::string result_json(const Totals& t, uint64_t done_ns, size_t files) {
  return fmt::format(
      "{{\"start_ns\": {}, \"first_byte_ns\": {}, \"done_ns\": {}, \"bytes\": {}, \"sum\": {}, "
      "\"files\": {}}}\n",
      t.start_ns, t.first_byte_ns, done_ns, t.bytes, t.sum, files);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Reads a benchmark scenario's files the way a restored process does"};
  std::string plan_file, root, ready_file, go_file, result_file;
  bool hold = false;
  app.add_option("--plan", plan_file, "Read plan written by lazyfs-bench")->required();
  app.add_option("--root", root, "Prefix of every path in the plan (default none)");
  app.add_flag("--hold", hold, "Open everything, then wait for --go-file (CRIU migrations)");
  app.add_option("--ready-file", ready_file, "Created once everything is open (--hold)");
  app.add_option("--go-file", go_file, "Start reading once this exists (--hold)");
  app.add_option("--result-file", result_file, "Write the JSON here instead of stdout");
  CLI11_PARSE(app, argc, argv);
  if (hold && (go_file.empty() || ready_file.empty() || result_file.empty())) {
    fmt::print(stderr,
               "lazyfs-bench-workload: --hold needs --ready-file, --go-file and "
               "--result-file\n");
    return 2;
  }
  while (!root.empty() && root.back() == '/') root.pop_back();
  try {
    const lb::Plan plan = lb::read_plan(plan_file);
    Totals t;
    std::vector<uint8_t> buf(1u << 20);
    std::vector<Opened> opened;
    if (hold) {
      for (const auto& step : plan) opened.push_back(open_step(step, root));
      std::ofstream(ready_file) << "ready\n";
      struct stat st {};
      while (::stat(go_file.c_str(), &st) != 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      t.start_ns = now_ns();
      for (const auto& o : opened) read_step(o, buf, t);
    } else {
      t.start_ns = now_ns();
      for (const auto& step : plan) {
        Opened o = open_step(step, root);
        read_step(o, buf, t);
        if (o.map) ::munmap(const_cast<uint8_t*>(o.map), o.map_size);
        ::close(o.fd);
      }
    }
    const std::string json = result_json(t, now_ns(), plan.size());
    if (result_file.empty()) {
      fmt::print("{}", json);
    } else {
      const std::string tmp = result_file + ".tmp";
      std::ofstream(tmp) << json;
      std::filesystem::rename(tmp, result_file);
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "lazyfs-bench-workload: {}\n", e.what());
    return 1;
  }
}
