// Writes a minimal CRIU checkpoint directory describing a set of files:
// inventory.img and files.img, framed and encoded as CRIU 4.x writes them, so
// the catalog and `lazyfs prepare` treat it like a real dump. For the
// benchmarks and tests that need checkpoints of their own files; it holds no
// process state, so `criu restore` cannot restore it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lazyfs {

struct CheckpointFile {
  std::string path;              // absolute path on the source
  std::optional<uint64_t> size;  // none for an O_APPEND writer
  uint32_t mode = 0100644;       // whole st_mode
  uint32_t flags = 0;            // open(2) flags
  uint64_t pos = 0;
};

// Writes `dir`/inventory.img and `dir`/files.img (creating `dir`). `run_id`
// becomes the dump's run id, and with it part of the checkpoint identity.
// Throws ImageError / std::runtime_error.
void write_checkpoint(const std::filesystem::path& dir, const std::vector<CheckpointFile>& files,
                      const std::string& run_id);

}  // namespace lazyfs
