#include "lazyfs/source.h"

#include <sys/stat.h>

#include <fmt/core.h>

#include <cerrno>
#include <cstring>

namespace lazyfs {

const char* source_state_name(SourceState state) {
  switch (state) {
    case SourceState::kConnected:
      return "connected";
    case SourceState::kRetrying:
      return "retrying";
    case SourceState::kDown:
      return "down";
  }
  return "?";
}

std::string changed_since(const SourceStat& then, const SourceStat& now) {
  if ((then.mode & S_IFMT) != (now.mode & S_IFMT)) {
    return fmt::format("type {:o} -> {:o}", then.mode & S_IFMT, now.mode & S_IFMT);
  }
  if (then.size != now.size) return fmt::format("size {} -> {}", then.size, now.size);
  if (then.mtime != now.mtime) return fmt::format("mtime {} -> {}", then.mtime, now.mtime);
  return {};
}

Status shutting_down() {
  return Status::permanent(ECANCELED, "lazyfs is shutting down");
}

Status read_into(Source& source, const std::string& path, uint64_t offset, std::span<std::byte> buf,
                 size_t& got) {
  got = 0;
  return source.read(path, offset, buf.size(), [&](uint64_t at, std::span<const std::byte> data) {
    // Chunks are contiguous and ascending from `offset`.
    std::memcpy(buf.data() + (at - offset), data.data(), data.size());
    got = static_cast<size_t>(at - offset) + data.size();
  });
}

namespace {

// Every call fails with why the source could not be reached.
class UnreachableSource : public Source {
 public:
  UnreachableSource(std::string description, Status reason)
      : description_(std::move(description)),
        reason_(Status::permanent(reason.errnum() ? reason.errnum() : EHOSTUNREACH,
                                  reason.message())) {}

  std::string describe() const override { return description_; }
  Status stat(const std::string&, SourceStat&) override { return reason_; }
  Status read(const std::string&, uint64_t, uint64_t, const ChunkSink&) override { return reason_; }
  unsigned max_concurrency() const override { return 1; }
  SourceState state() const override { return SourceState::kDown; }

 private:
  std::string description_;
  Status reason_;
};

}  // namespace

std::unique_ptr<Source> make_unreachable_source(std::string description, Status reason) {
  return std::make_unique<UnreachableSource>(std::move(description), std::move(reason));
}

}  // namespace lazyfs
