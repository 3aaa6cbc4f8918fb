#include "prepare_marker.h"

#include <fmt/core.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "lazyfs/fileio.h"
#include "lazyfs/hash.h"
#include "lazyfs/image.h"
#include "lazyfs/log.h"
#include "lazyfs/prepare.h"

namespace lazyfs {

std::filesystem::path live_files_image(const std::filesystem::path& image_dir) {
  std::error_code ec;
  auto files = image_dir / "files.img";
  return std::filesystem::exists(files, ec) ? files : image_dir / "reg-files.img";
}

std::optional<PrepareMarker> read_prepare_marker(const std::filesystem::path& image_dir,
                                                 const std::filesystem::path& live) {
  std::vector<uint8_t> bytes;
  if (read_whole_file(image_dir / kPrepareMarker, 1 << 20, bytes)) return std::nullopt;
  PrepareMarker m;
  try {
    auto j = nlohmann::json::parse(bytes.begin(), bytes.end());
    m.mountpoint = j.at("mountpoint").get<std::string>();
    m.all = j.at("all").get<bool>();
    m.rewritten_sha256 = j.at("rewritten_sha256").get<std::string>();
    m.original = j.at("original").get<std::string>();
  } catch (const std::exception& e) {
    log::warn("prepare", "ignoring unreadable {}: {}", (image_dir / kPrepareMarker).string(),
              e.what());
    return std::nullopt;
  }
  std::vector<uint8_t> image;
  if (read_whole_file(live, kMaxImageBytes, image)) return std::nullopt;
  if (sha256_hex({reinterpret_cast<const char*>(image.data()), image.size()}) !=
      m.rewritten_sha256) {
    // The image was replaced (a new dump into the same directory): the
    // marker and the kept original describe an older one.
    return std::nullopt;
  }
  std::error_code ec;
  if (m.original.find('/') != std::string::npos ||
      !std::filesystem::exists(image_dir / m.original, ec)) {
    throw std::runtime_error(
        fmt::format("{}: prepared by lazyfs, but the original image {} is missing; cannot read the "
                    "original paths",
                    live.string(), m.original));
  }
  return m;
}

void write_prepare_marker(const std::filesystem::path& image_dir, const PrepareMarker& marker) {
  nlohmann::json j{{"mountpoint", marker.mountpoint},
                   {"all", marker.all},
                   {"rewritten_sha256", marker.rewritten_sha256},
                   {"original", marker.original}};
  auto path = image_dir / kPrepareMarker;
  if (auto ec = write_file_atomic(path, j.dump(2) + "\n", 0644)) {
    throw std::runtime_error(fmt::format("{}: cannot write: {}", path.string(), ec.message()));
  }
}

}  // namespace lazyfs
