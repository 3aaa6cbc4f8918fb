#include "lazyfs/source.h"

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

Status read_into(Source& source, const std::string& path, uint64_t offset, std::span<std::byte> buf,
                 size_t& got) {
  got = 0;
  return source.read(path, offset, buf.size(), [&](uint64_t at, std::span<const std::byte> data) {
    // Chunks are contiguous and ascending from `offset`.
    std::memcpy(buf.data() + (at - offset), data.data(), data.size());
    got = static_cast<size_t>(at - offset) + data.size();
  });
}

}  // namespace lazyfs
