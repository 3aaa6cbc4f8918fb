// Small POSIX file helpers shared by the image reader, the cache and the
// prepare step: an owning fd, reading a bounded file whole, and the
// write-temporary-fsync-rename sequence that makes a replacement atomic and
// durable.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace lazyfs {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

inline std::error_code errno_code(int e) {
  return {e, std::system_category()};
}
std::error_code last_errno();

// Reads a regular file of at most `max_bytes` whole. EFBIG past the limit.
std::error_code read_whole_file(const std::filesystem::path& file, uint64_t max_bytes,
                                std::vector<uint8_t>& out);

// Writes all of `data` at `offset`, retrying short writes and EINTR.
std::error_code pwrite_all(int fd, const void* data, size_t size, uint64_t offset);
// Reads exactly `size` bytes at `offset`; EIO if the file ends first.
std::error_code pread_all(int fd, void* data, size_t size, uint64_t offset);

// Replaces `file` with `data` so that a crash leaves either the old or the new
// content, never a mix: temporary file in the same directory, fsync, rename,
// fsync of the directory.
std::error_code write_file_atomic(const std::filesystem::path& file, std::string_view data,
                                  unsigned mode = 0644);

std::error_code fsync_dir(const std::filesystem::path& dir);

}  // namespace lazyfs
