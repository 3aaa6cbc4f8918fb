// LocalSource: file:///DIR. Reads ROOT + path with pread, in chunks so the
// engine can store and wake waiters as bytes arrive, as with a network source.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <cstring>
#include <vector>

#include "lazyfs/fileio.h"
#include "lazyfs/source.h"

namespace lazyfs {
namespace {

constexpr size_t kChunkBytes = 256 << 10;
constexpr unsigned kConcurrency = 4;

class LocalSource final : public Source {
 public:
  explicit LocalSource(std::string root) : root_(std::move(root)) {}

  std::string describe() const override { return "file://" + root_; }

  Status stat(const std::string& path, SourceStat& out) override {
    ++counters_.stats;
    struct stat st;
    auto full = full_path(path);
    if (::stat(full.c_str(), &st) != 0) return error(errno, "stat", full);
    out.mode = st.st_mode;
    out.size = static_cast<uint64_t>(st.st_size);
    out.uid = st.st_uid;
    out.gid = st.st_gid;
    out.atime = st.st_atim.tv_sec;
    out.mtime = st.st_mtim.tv_sec;
    return {};
  }

  Status read(const std::string& path, uint64_t offset, uint64_t length,
              const ChunkSink& sink) override {
    return read_checked(path, offset, length, sink, std::nullopt);
  }

  void read_many(std::span<const ReadRange> ranges, const ReadDone& done) override {
    for (size_t i = 0; i < ranges.size(); ++i) {
      const auto& r = ranges[i];
      done(i, read_checked(r.path, r.offset, r.length, r.sink, r.expect));
    }
  }

  unsigned max_concurrency() const override { return kConcurrency; }

 private:
  // read(), refused with ESTALE if the open file is not the one `expect`
  // describes.
  Status read_checked(const std::string& path, uint64_t offset, uint64_t length,
                      const ChunkSink& sink, const std::optional<SourceStat>& expect) {
    ++counters_.reads;
    auto full = full_path(path);
    UniqueFd fd(::open(full.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return error(errno, "open", full);
    if (expect) {
      struct stat st;
      if (::fstat(fd.get(), &st) != 0) return error(errno, "fstat", full);
      SourceStat now;
      now.mode = st.st_mode;
      now.size = static_cast<uint64_t>(st.st_size);
      now.mtime = st.st_mtim.tv_sec;
      if (auto why = changed_since(*expect, now); !why.empty()) {
        return Status::permanent(
            ESTALE, fmt::format("{} changed on the source since it was checked ({})", full, why));
      }
    }
    std::vector<std::byte> buf(static_cast<size_t>(std::min<uint64_t>(length, kChunkBytes)));
    while (length > 0) {
      auto want = static_cast<size_t>(std::min<uint64_t>(length, buf.size()));
      ssize_t n = ::pread(fd.get(), buf.data(), want, static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        return error(errno, "read", full);
      }
      if (n == 0) break;  // end of file
      auto got = static_cast<size_t>(n);
      counters_.bytes_read += got;
      sink(offset, std::span<const std::byte>(buf.data(), got));
      offset += got;
      length -= got;
    }
    return {};
  }

  std::string full_path(const std::string& path) const {
    return root_ == "/" ? path : root_ + path;
  }

  static Status error(int err, const char* what, const std::string& full) {
    auto msg = fmt::format("{} {}: {}", what, full, std::strerror(err));
    // A missing or forbidden file stays so; anything else may be passing.
    if (err == ENOENT || err == EACCES || err == ENOTDIR || err == EISDIR || err == ELOOP) {
      return Status::permanent(err, msg);
    }
    return Status::transient(err, msg);
  }

  std::string root_;
};

}  // namespace

std::unique_ptr<Source> make_local_source(const std::string& root, Status& status) {
  std::string r = root;
  while (r.size() > 1 && r.back() == '/') r.pop_back();
  struct stat st;
  if (r.empty() || r.front() != '/') {
    status = Status::permanent(EINVAL, fmt::format("file source root {} is not absolute", root));
    return nullptr;
  }
  if (::stat(r.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    status = Status::permanent(ENOENT, fmt::format("file source root {} is not a directory", r));
    return nullptr;
  }
  status = {};
  return std::make_unique<LocalSource>(r);
}

}  // namespace lazyfs
