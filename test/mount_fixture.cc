#include "mount_fixture.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "lazyfs/hash.h"
#include "test_util.h"

namespace lazyfs::test {

namespace {

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t path_seed(const std::string& path) {
  return std::stoull(sha256_hex(path).substr(0, 15), nullptr, 16);
}

}  // namespace

uint8_t source_byte(const std::string& path, uint64_t offset) {
  return static_cast<uint8_t>(mix(path_seed(path) ^ (offset / 8)) >> (8 * (offset % 8)));
}

std::vector<uint8_t> source_bytes(const std::string& path, uint64_t offset, size_t length) {
  const uint64_t seed = path_seed(path);
  std::vector<uint8_t> out(length);
  for (size_t i = 0; i < length; ++i) {
    const uint64_t o = offset + i;
    out[i] = static_cast<uint8_t>(mix(seed ^ (o / 8)) >> (8 * (o % 8)));
  }
  return out;
}

std::vector<uint8_t> file_bytes(const CatalogFile& f) {
  auto bytes = source_bytes(f.path, 0, static_cast<size_t>(f.size.value_or(kAppendSize)));
  if (f.has_build_id && bytes.size() >= 4)
    std::memcpy(bytes.data(),
                "\x7f"
                "ELF",
                4);
  return bytes;
}

void populate_source(const Catalog& catalog, const std::filesystem::path& root) {
  for (const auto& f : catalog.files()) {
    auto file = std::filesystem::path(root.string() + f.path);
    std::filesystem::create_directories(file.parent_path());
    write_bytes(file, file_bytes(f));
    if (f.mode) ::chmod(file.c_str(), *f.mode & 07777);
  }
}

bool is_mounted(const std::filesystem::path& path) {
  std::ifstream in("/proc/self/mounts");
  std::string dev, mp;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    fields >> dev >> mp;
    if (mp == path.string()) return true;
  }
  return false;
}

std::vector<uint8_t> read_file(const std::filesystem::path& file) {
  return read_bytes(file);
}

LazyfsMount::LazyfsMount(const std::filesystem::path& mountpoint,
                         const std::filesystem::path& image_dir, const std::string& source,
                         const std::vector<std::string>& extra,
                         const std::vector<std::string>& launcher)
    : mountpoint_(mountpoint) {
  // The detached daemon's parent exits; as subreaper this process inherits
  // and reaps it, so a stopped daemon never lingers as a zombie.
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);
  std::error_code ec;  // a stale mount there is for `lazyfs mount` to replace
  std::filesystem::create_directories(mountpoint, ec);
  std::vector<std::string> args{"mount"};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(mountpoint.string());
  args.push_back(image_dir.string());
  args.push_back(source);
  CommandResult r;
  if (launcher.empty()) {
    r = run_lazyfs(args);
  } else {
    std::vector<std::string> full(launcher.begin() + 1, launcher.end());
    full.push_back(std::string(LAZYFS_BIN_DIR) + "/lazyfs");
    full.insert(full.end(), args.begin(), args.end());
    r = run_program(launcher[0], full);
  }
  if (r.status != 0) {
    throw std::runtime_error("lazyfs mount failed (" + std::to_string(r.status) + "): " + r.err);
  }
  pid_ = status()["pid"].get<pid_t>();
}

nlohmann::json LazyfsMount::status() const {
  auto r = run_lazyfs({"status", "--json", mountpoint_.string()});
  if (r.status != 0) throw std::runtime_error("lazyfs status failed: " + r.err);
  return nlohmann::json::parse(r.out);
}

bool LazyfsMount::stop() {
  if (pid_ <= 0) return true;
  ::kill(pid_, SIGTERM);
  for (int i = 0; i < 300; ++i) {
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_ || (::kill(pid_, 0) != 0 && errno == ESRCH)) {
      pid_ = -1;
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

LazyfsMount::~LazyfsMount() {
  if (!stop()) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    ::umount2(mountpoint_.c_str(), MNT_DETACH);
  }
}

}  // namespace lazyfs::test
