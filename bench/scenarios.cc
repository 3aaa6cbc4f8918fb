#include "scenarios.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>

#include "content.h"
#include "interrupt.h"
#include "lazyfs/checkpoint_writer.h"
#include "lazyfs/fileio.h"

namespace lazyfs::bench {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kKiB = 1024, kMiB = kKiB * 1024, kGiB = kMiB * 1024;
constexpr uint64_t kPage = 4096;

uint64_t scaled(uint64_t full, double scale, uint64_t floor) {
  const double v = static_cast<double>(full) * scale;
  uint64_t bytes = static_cast<uint64_t>(std::llround(v));
  bytes = bytes / kPage * kPage;
  return std::max(bytes, floor);
}

uint64_t sum_of(const std::string& path, uint64_t offset, uint64_t length) {
  const uint64_t seed = path_seed(path);
  std::vector<uint8_t> buf(static_cast<size_t>(std::min<uint64_t>(length, 4 * kMiB)));
  uint64_t sum = 0;
  while (length > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length, buf.size()));
    fill_content(seed, offset, buf.data(), n);
    sum += byte_sum(buf.data(), n);
    offset += n;
    length -= n;
  }
  return sum;
}

// `count` distinct page-aligned offsets in [from, size - len], in random order.
std::vector<uint64_t> random_offsets(std::mt19937_64& rng, uint64_t from, uint64_t size,
                                     uint64_t len, size_t count) {
  const uint64_t first = from / kPage, last = (size - len) / kPage;
  std::uniform_int_distribution<uint64_t> pick(first, last);
  std::set<uint64_t> seen;
  std::vector<uint64_t> out;
  const bool distinct = last - first + 1 >= count;
  while (out.size() < count) {
    const uint64_t page = pick(rng);
    if (distinct && !seen.insert(page).second) continue;
    out.push_back(page * kPage);
  }
  return out;
}

Scenario big_sparse(double scale) {
  Scenario s;
  s.name = "big-sparse";
  s.description = "one 2 GiB file; reads the first 1 MiB and 64 random 4 KiB blocks";
  const SourceFile f{"/bench/big-sparse/data.bin", scaled(2 * kGiB, scale, 4 * kMiB)};
  s.files.push_back(f);
  std::mt19937_64 rng(0xb16);
  PlanStep step{f.path, PlanStep::Kind::kRanges, 0, {{0, kMiB}}};
  for (uint64_t off : random_offsets(rng, kMiB, f.size, 4 * kKiB, 64)) {
    step.ranges.emplace_back(off, 4 * kKiB);
  }
  s.plan.push_back(step);
  return s;
}

Scenario many_small(double scale) {
  Scenario s;
  s.name = "many-small";
  s.description = "5,000 files of 4 to 64 KiB; reads one in ten, whole";
  const auto count = static_cast<size_t>(std::max<long long>(20, std::llround(5000 * scale)));
  std::mt19937_64 rng(0x5a11);
  std::uniform_int_distribution<uint64_t> size(4 * kKiB, 64 * kKiB);
  for (size_t i = 0; i < count; ++i) {
    SourceFile f{fmt::format("/bench/many-small/d{:03}/f{:05}.dat", i / 100, i), size(rng)};
    if (i % 10 == 3) s.plan.push_back({f.path, PlanStep::Kind::kWhole, 64 * kKiB, {}});
    s.files.push_back(std::move(f));
  }
  return s;
}

Scenario full_sequential(double scale) {
  Scenario s;
  s.name = "full-sequential";
  s.description = "one 1 GiB file; reads it to the end (1 MiB reads)";
  const SourceFile f{"/bench/full-sequential/data.bin", scaled(kGiB, scale, kMiB)};
  s.files.push_back(f);
  s.plan.push_back({f.path, PlanStep::Kind::kWhole, kMiB, {}});
  return s;
}

Scenario mmap_random(double scale) {
  Scenario s;
  s.name = "mmap-random";
  s.description = "one 512 MiB file; maps it and touches 1,000 random pages";
  const SourceFile f{"/bench/mmap-random/data.bin", scaled(512 * kMiB, scale, 4 * kMiB)};
  s.files.push_back(f);
  std::mt19937_64 rng(0x3a9);
  PlanStep step{f.path, PlanStep::Kind::kMmap, 0, {}};
  for (uint64_t off : random_offsets(rng, 0, f.size, kPage, 1000)) step.ranges.emplace_back(off, 1);
  s.plan.push_back(step);
  return s;
}

uint64_t file_size_of(const Scenario& s, const std::string& path) {
  for (const auto& f : s.files) {
    if (f.path == path) return f.size;
  }
  return 0;
}

std::string stamp_text(const Scenario& s) {
  std::ostringstream out;
  out << "lazyfs-bench content v1\n";
  for (const auto& f : s.files) out << f.path << ' ' << f.size << '\n';
  return out.str();
}

bool stamp_matches(const Scenario& s, const fs::path& root) {
  std::ifstream in(root / ".stamps" / s.name);
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str() != stamp_text(s)) return false;
  std::error_code ec;
  for (const auto& f : s.files) {
    if (fs::file_size(root.string() + f.path, ec) != f.size || ec) return false;
  }
  return true;
}

}  // namespace

const std::vector<std::string>& scenario_names() {
  static const std::vector<std::string> names{"big-sparse", "many-small", "full-sequential",
                                              "mmap-random"};
  return names;
}

Scenario make_scenario(const std::string& name, double scale) {
  Scenario s;
  if (name == "big-sparse") {
    s = big_sparse(scale);
  } else if (name == "many-small") {
    s = many_small(scale);
  } else if (name == "full-sequential") {
    s = full_sequential(scale);
  } else if (name == "mmap-random") {
    s = mmap_random(scale);
  } else {
    throw std::invalid_argument("unknown scenario " + name);
  }
  for (const auto& f : s.files) s.total_bytes += f.size;
  for (const auto& step : s.plan) {
    const uint64_t size = file_size_of(s, step.path);
    switch (step.kind) {
      case PlanStep::Kind::kWhole:
        s.bytes_read += size;
        s.expected_sum += sum_of(step.path, 0, size);
        break;
      case PlanStep::Kind::kRanges:
        for (const auto& [off, len] : step.ranges) {
          const uint64_t n = std::min(len, size - std::min(off, size));
          s.bytes_read += n;
          s.expected_sum += sum_of(step.path, off, n);
        }
        break;
      case PlanStep::Kind::kMmap:
        for (const auto& r : step.ranges) {
          s.bytes_read += 1;
          s.expected_sum += content_byte(path_seed(step.path), r.first);
        }
        break;
    }
  }
  return s;
}

uint64_t Scenario::touched_bytes(uint64_t block) const {
  uint64_t total = 0;
  for (const auto& step : plan) {
    const uint64_t size = file_size_of(*this, step.path);
    std::set<uint64_t> blocks;
    if (step.kind == PlanStep::Kind::kWhole) {
      total += size;
      continue;
    }
    for (const auto& [off, len] : step.ranges) {
      const uint64_t end = std::min(size, off + std::max<uint64_t>(len, 1));
      for (uint64_t b = off / block; b * block < end; ++b) blocks.insert(b);
    }
    for (uint64_t b : blocks) total += std::min(block, size - b * block);
  }
  return total;
}

uint64_t bytes_to_generate(const Scenario& s, const fs::path& root) {
  return stamp_matches(s, root) ? 0 : s.total_bytes;
}

void generate(const Scenario& s, const fs::path& root,
              const std::function<void(uint64_t)>& progress) {
  if (stamp_matches(s, root)) return;
  std::error_code ec;
  fs::remove(root / ".stamps" / s.name, ec);
  fs::remove_all(root.string() + s.dir(), ec);
  std::vector<uint8_t> buf(4 * kMiB);
  uint64_t written = 0;
  for (const auto& f : s.files) {
    const fs::path file = root.string() + f.path;
    fs::create_directories(file.parent_path());
    UniqueFd fd(::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd) throw std::runtime_error("cannot create " + file.string());
    const uint64_t seed = path_seed(f.path);
    for (uint64_t off = 0; off < f.size;) {
      check_interrupted();
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), f.size - off));
      fill_content(seed, off, buf.data(), n);
      if (auto e = pwrite_all(fd.get(), buf.data(), n, off)) {
        throw std::runtime_error(fmt::format("write {}: {}", file.string(), e.message()));
      }
      off += n;
      written += n;
      if (progress) progress(written);
    }
  }
  ::sync();
  fs::create_directories(root / ".stamps");
  std::ofstream(root / ".stamps" / s.name, std::ios::trunc) << stamp_text(s);
}

void write_scenario_checkpoint(const Scenario& s, const fs::path& dir) {
  std::vector<CheckpointFile> files;
  for (const auto& f : s.files) {
    CheckpointFile cf;
    cf.path = f.path;
    cf.size = f.size;
    cf.mode = 0100644;
    cf.flags = O_RDONLY;
    files.push_back(cf);
  }
  write_checkpoint(dir, files, "lazyfs-bench-" + s.name);
}

}  // namespace lazyfs::bench
