// The benchmark's scenarios: which files a checkpointed process holds (paths
// under /bench/NAME, sizes scaled by --scale) and what the restored process
// reads from them (a Plan). Also writing those files into the source tree
// and the checkpoint describing them. Everything is a pure function of the
// name and the scale, so repeated runs read the same bytes in the same order.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "plan.h"

namespace lazyfs::bench {

struct SourceFile {
  std::string path;  // checkpoint path, absolute
  uint64_t size = 0;
};

struct Scenario {
  std::string name;
  std::string description;
  std::vector<SourceFile> files;
  Plan plan;
  uint64_t total_bytes = 0;   // of all files
  uint64_t bytes_read = 0;    // what the plan reads
  uint64_t expected_sum = 0;  // byte sum of what the plan reads
  // The directory holding every file of the scenario ("/bench/NAME").
  std::string dir() const { return "/bench/" + name; }
  // Bytes in the `block`-aligned blocks the plan touches (what an ideal
  // lazy fetcher with that block size must move).
  uint64_t touched_bytes(uint64_t block) const;
};

const std::vector<std::string>& scenario_names();
// Throws std::invalid_argument for an unknown name.
Scenario make_scenario(const std::string& name, double scale);

// Bytes generate() would write into `root` now (0 if the files are there).
uint64_t bytes_to_generate(const Scenario& s, const std::filesystem::path& root);
// Writes the scenario's files at ROOT + path, unless a stamp under
// ROOT/.stamps says an identical set is already there. `progress` gets the
// bytes written so far.
void generate(const Scenario& s, const std::filesystem::path& root,
              const std::function<void(uint64_t)>& progress);

// Writes a checkpoint (inventory.img, files.img) describing the files.
void write_scenario_checkpoint(const Scenario& s, const std::filesystem::path& dir);

}  // namespace lazyfs::bench
