// The marker `lazyfs prepare` leaves in a checkpoint directory, shared by
// prepare (which writes it) and the catalog (which reads the original image
// when the marker matches the live one). Internal to liblazyfs.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace lazyfs {

struct PrepareMarker {
  std::string mountpoint;
  bool all = false;
  std::string rewritten_sha256;  // of the live image prepare wrote
  std::string original;          // file name of the kept original
};

// files.img, or reg-files.img when there is no files.img.
std::filesystem::path live_files_image(const std::filesystem::path& image_dir);

// The marker, if there is one and it describes `live` as it is now.
std::optional<PrepareMarker> read_prepare_marker(const std::filesystem::path& image_dir,
                                                 const std::filesystem::path& live);
void write_prepare_marker(const std::filesystem::path& image_dir, const PrepareMarker& marker);

}  // namespace lazyfs
