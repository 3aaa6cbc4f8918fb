// The checkpoint catalog: which regular files a CRIU restore will open, read
// from a checkpoint's image directory (files.img, or the legacy reg-files.img
// of CRIU before 3.4, plus remap-fpath.img and inventory.img).
//
// Served: S_ISREG entries whose path is clean, once per path however many ids
// name it, except ghosts (deleted on the source; their bytes are in the image
// dir) and other remapped files. Kept beside them: the directories the
// checkpoint records (cwd, root), which a restore opens by path, and every
// entry that was left out, with its reason.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace lazyfs {

// One CRIU id that names a file, and how that id opened it.
struct Opener {
  uint32_t id = 0;
  uint32_t flags = 0;  // open(2) flags
  uint64_t pos = 0;    // file position at dump time
  int32_t mnt_id = -1;
};

struct CatalogFile {
  std::string path;
  // Absent when CRIU recorded no size: O_APPEND writers (the file may grow
  // while the checkpoint is moved; the source's size is used instead).
  std::optional<uint64_t> size;
  // The whole st_mode. Absent only in images older than CRIU's mode field, in
  // which case the entry was taken as a regular file because it has a size.
  std::optional<uint32_t> mode;
  std::vector<Opener> openers;
  bool has_build_id = false;  // a mapped ELF whose build-id restore checks
};

struct CatalogDir {
  std::string path;
  uint32_t mode = 0;
  std::vector<uint32_t> ids;
};

struct SkippedEntry {
  uint32_t id = 0;
  std::string path;
  std::string reason;  // "directory", "device", "ghost", "invalid-path", ...
  std::string detail;  // a human sentence, for invalid paths the fault
};

class Catalog {
 public:
  // Which names to read after `lazyfs prepare` rewrote the files image.
  enum class Names {
    kOriginal,  // the source's paths, from the original prepare kept
    kAsIs,      // what the live image says (what `criu restore` will open)
  };

  // Throws ImageError (file, offset, fault) for an unreadable or corrupt
  // image, and std::runtime_error for a missing directory or files image.
  static Catalog load(const std::filesystem::path& image_dir, Names names = Names::kOriginal);

  const std::vector<CatalogFile>& files() const { return files_; }
  const std::vector<CatalogDir>& dirs() const { return dirs_; }
  const std::vector<SkippedEntry>& skipped() const { return skipped_; }

  // Stable identity of this checkpoint (hex SHA-256 over the dump's run id and
  // the original files image), so two checkpoints never share cache files.
  const std::string& identity() const { return identity_; }
  // The image the entries were read from (files.img or reg-files.img).
  const std::filesystem::path& files_image() const { return files_image_; }
  const std::filesystem::path& image_dir() const { return image_dir_; }

  // Sum of the recorded sizes of the served files.
  uint64_t total_bytes() const;
  const CatalogFile* find_file(std::string_view path) const;

 private:
  struct RawEntry;  // one reg_file_entry, decoded
  void add_entry(const RawEntry& entry, const std::string& remap_reason);

  std::filesystem::path image_dir_;
  std::filesystem::path files_image_;
  std::string identity_;
  std::vector<CatalogFile> files_;
  std::vector<CatalogDir> dirs_;
  std::vector<SkippedEntry> skipped_;
  std::unordered_map<std::string, size_t> file_index_;
  std::unordered_map<std::string, size_t> dir_index_;
};

// Whether this host already has the file: a regular file at the same path
// with the recorded size (any size when none was recorded).
bool exists_locally(const CatalogFile& file);
// Whether this host has a directory at the path.
bool exists_locally(const CatalogDir& dir);

// "-rw-r-----" style rendering of a whole st_mode.
std::string mode_string(uint32_t mode);

}  // namespace lazyfs
