// Helpers shared by the unit tests: the fixture checkpoint, scratch
// directories that clean up after themselves, and running the lazyfs command.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

namespace lazyfs::test {

inline const std::filesystem::path kFixture =
    std::filesystem::path(LAZYFS_TEST_DATA) / "criu-4.2-single";

// A fresh directory under the build tree's tmp, removed with its contents.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag);
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Copies the fixture checkpoint into `dir` (writable copies).
void copy_fixture(const std::filesystem::path& dir);

std::vector<uint8_t> read_bytes(const std::filesystem::path& file);
void write_bytes(const std::filesystem::path& file, const std::vector<uint8_t>& bytes);

struct CommandResult {
  int status = -1;  // exit status, or 128+signal
  std::string out;
  std::string err;
};
// Runs `program` (looked up in PATH if it has no slash) with `args`,
// capturing stdout and stderr.
CommandResult run_program(const std::string& program, const std::vector<std::string>& args);
// Runs build/bin/lazyfs with `args`.
CommandResult run_lazyfs(const std::vector<std::string>& args);

// Polls `pred` every 5 ms for up to `limit`.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  for (auto t0 = std::chrono::steady_clock::now(); std::chrono::steady_clock::now() - t0 < limit;) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

}  // namespace lazyfs::test
