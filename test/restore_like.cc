// lazyfs-restore-like IMGDIR: opens every served file the way CRIU's restore
// does, from the files image as it is (after `lazyfs prepare`, the names
// inside the mount): open at the recorded path with the recorded flags, fstat
// and compare size and whole mode with the checkpoint, seek to the recorded
// position, read the ELF header of files with a build-id, map each non-empty
// readable file shared and read-only and read its first page (as the
// restored process's first access would), open each recorded directory.
// Prints one line per problem and a summary with the time to the first byte
// read and in all; exit 0 when all pass.
// Stands in for `criu restore` where no working CRIU is available.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "lazyfs/catalog.h"

using lazyfs::Catalog;

namespace {

int problems = 0;
const auto start = std::chrono::steady_clock::now();
double first_byte_s = -1;

void note_first_byte() {
  if (first_byte_s < 0) {
    first_byte_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

template <typename... Args>
void problem(fmt::format_string<Args...> f, Args&&... args) {
  ++problems;
  fmt::print(stderr, "restore-like: {}\n", fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fmt::print(stderr, "usage: lazyfs-restore-like IMGDIR\n");
    return 2;
  }
  std::optional<Catalog> cat;
  try {
    cat.emplace(Catalog::load(argv[1], Catalog::Names::kAsIs));
  } catch (const std::exception& e) {
    fmt::print(stderr, "restore-like: {}\n", e.what());
    return 2;
  }
  size_t opened = 0;
  uint64_t touched = 0;
  for (const auto& f : cat->files()) {
    for (const auto& o : f.openers) {
      // CRIU reopens with the dump's flags minus the creation ones.
      const int flags = static_cast<int>(o.flags) & ~(O_CREAT | O_TRUNC | O_EXCL | O_NOCTTY);
      int fd = ::open(f.path.c_str(), flags | O_CLOEXEC);
      if (fd < 0) {
        problem("Can't open file {} on restore: {}", f.path, std::strerror(errno));
        continue;
      }
      ++opened;
      struct stat st;
      ::fstat(fd, &st);
      const bool append_writer = (o.flags & O_APPEND) && (o.flags & O_ACCMODE) == O_WRONLY;
      if (f.size && !append_writer && static_cast<uint64_t>(st.st_size) != *f.size) {
        problem("File {} has bad size {} (expect {})", f.path, st.st_size, *f.size);
      }
      if (f.mode && st.st_mode != *f.mode) {
        problem("File {} has bad mode 0{:o} (expect 0{:o})", f.path, st.st_mode, *f.mode);
      }
      if (::lseek(fd, static_cast<off_t>(o.pos), SEEK_SET) != static_cast<off_t>(o.pos)) {
        problem("Can't restore file pos of {}: {}", f.path, std::strerror(errno));
      }
      if (f.has_build_id) {
        char elf[64];
        if (::pread(fd, elf, sizeof elf, 0) != static_cast<ssize_t>(sizeof elf) ||
            std::memcmp(elf,
                        "\x7f"
                        "ELF",
                        4) != 0) {
          problem("File {} has no ELF header to check its build-id", f.path);
        }
        note_first_byte();
      }
      const bool readable = (o.flags & O_ACCMODE) != O_WRONLY;
      if (readable && st.st_size > 0) {
        const auto len = static_cast<size_t>(st.st_size);
        void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
          problem("Can't map {}: {}", f.path, std::strerror(errno));
        } else {
          volatile const char* p = static_cast<const char*>(map);
          touched += static_cast<unsigned char>(p[0]);
          note_first_byte();
          ::munmap(map, len);
        }
      }
      ::close(fd);
    }
  }
  for (const auto& d : cat->dirs()) {
    int fd = ::open(d.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      problem("Can't open dir {} on restore: {}", d.path, std::strerror(errno));
      continue;
    }
    struct stat st;
    ::fstat(fd, &st);
    if (st.st_mode != d.mode) problem("Dir {} has bad mode 0{:o}", d.path, st.st_mode);
    ::close(fd);
  }
  const double total =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print(
      "restore-like: {} opens of {} files, {} dirs, {} problems; first byte after {:.3f} s, "
      "done after {:.3f} s\n",
      opened, cat->files().size(), cat->dirs().size(), problems, first_byte_s, total);
  return problems ? 1 : 0;
}
