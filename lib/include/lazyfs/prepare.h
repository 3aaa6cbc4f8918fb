// prepare: rewrite a checkpoint's files image so that stock CRIU's restore
// opens the served files (and recorded directories) through the lazyfs mount,
// at MOUNTPOINT + original path. CRIU opens `name` relative to the restorer's
// root when mnt_id is -1, so a name inside the mount is all it takes; no
// patched CRIU is needed.
//
// The original image is kept beside it (files.img.lazyfs-orig) with a marker
// (lazyfs-prepare.json) recording the mount point and the SHA-256 of the
// rewritten image. Catalog::load reads the original whenever the marker
// matches the image, so `lazyfs mount` sees the original paths whether prepare
// ran before it or not. Preparing again with the same options changes nothing;
// with other options it starts again from the original; undo puts the
// original back.
#pragma once

#include <filesystem>
#include <string>

namespace lazyfs {

inline constexpr const char* kPrepareMarker = "lazyfs-prepare.json";
inline constexpr const char* kOriginalSuffix = ".lazyfs-orig";

struct PrepareOptions {
  std::string mountpoint = "/lazyfs";
  bool all = false;  // redirect every served file, not only those missing here
};

struct PrepareResult {
  size_t files_redirected = 0;
  size_t dirs_redirected = 0;
  size_t left_alone = 0;      // served files present on this host
  size_t foreign_mounts = 0;  // entries with their own mnt_id, not redirected
  bool changed = false;       // false when the image was already so prepared
};

// Throws ImageError / std::runtime_error with a one-line reason.
PrepareResult prepare_checkpoint(const std::filesystem::path& image_dir,
                                 const PrepareOptions& options);

// Puts the original files image back; false if the checkpoint was not prepared.
bool undo_prepare(const std::filesystem::path& image_dir);

}  // namespace lazyfs
