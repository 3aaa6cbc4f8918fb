#include "lazyfs/fileio.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace lazyfs {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::error_code last_errno() {
  return errno_code(errno);
}

std::error_code read_whole_file(const std::filesystem::path& file, uint64_t max_bytes,
                                std::vector<uint8_t>& out) {
  UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return last_errno();
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return last_errno();
  if (!S_ISREG(st.st_mode)) return errno_code(S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
  if (static_cast<uint64_t>(st.st_size) > max_bytes) return errno_code(EFBIG);
  out.resize(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::read(fd.get(), out.data() + done, out.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_errno();
    }
    if (n == 0) break;  // shrank while we read: keep what is there
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  return {};
}

std::error_code pwrite_all(int fd, const void* data, size_t size, uint64_t offset) {
  auto p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::pwrite(fd, p, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_errno();
    }
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code pread_all(int fd, void* data, size_t size, uint64_t offset) {
  auto p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = ::pread(fd, p, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_errno();
    }
    if (n == 0) return errno_code(EIO);
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code fsync_dir(const std::filesystem::path& dir) {
  UniqueFd fd(::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return last_errno();
  if (::fsync(fd.get()) != 0) return last_errno();
  return {};
}

std::error_code write_file_atomic(const std::filesystem::path& file, std::string_view data,
                                  unsigned mode) {
  auto tmp = file;
  tmp += ".tmp-lazyfs";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
  if (!fd) return last_errno();
  auto fail = [&](std::error_code ec) {
    fd.reset();
    ::unlink(tmp.c_str());
    return ec;
  };
  if (auto ec = pwrite_all(fd.get(), data.data(), data.size(), 0)) return fail(ec);
  if (::fchmod(fd.get(), mode) != 0) return fail(last_errno());
  if (::fsync(fd.get()) != 0) return fail(last_errno());
  fd.reset();
  if (::rename(tmp.c_str(), file.c_str()) != 0) return fail(last_errno());
  return fsync_dir(file.parent_path());
}

}  // namespace lazyfs
