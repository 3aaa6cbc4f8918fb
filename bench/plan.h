// The read plan a workload follows: which files a restored process opens and
// what it reads from each, written by lazyfs-bench and replayed by
// lazyfs-bench-workload. One text line per step, so that the workload needs
// no parser beyond iostreams:
//
//   file PATH ranges      then one line "r OFFSET LENGTH" per seek-and-read
//   file PATH whole BUF   read to the end with BUF-byte reads
//   file PATH mmap        then one line "p OFFSET" per page touched
//
// PATH is the checkpoint's (absolute, no spaces); the workload opens ROOT +
// PATH. Read and parse both live here so the two sides cannot drift.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace lazyfs::bench {

struct PlanStep {
  enum class Kind { kRanges, kWhole, kMmap };
  std::string path;
  Kind kind = Kind::kRanges;
  uint64_t buffer = 0;  // kWhole: read size
  // kRanges: {offset, length}; kMmap: {page offset, 1}.
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
};

using Plan = std::vector<PlanStep>;

void write_plan(const std::filesystem::path& file, const Plan& plan);
// Throws std::runtime_error naming the line on a malformed plan.
Plan read_plan(const std::filesystem::path& file);

}  // namespace lazyfs::bench
