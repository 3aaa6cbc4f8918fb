#include "lazyfs/catalog.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <fmt/core.h>

#include <stdexcept>
#include <unordered_map>

#include "criu/fdinfo.pb.h"
#include "criu/inventory.pb.h"
#include "criu/regfile.pb.h"
#include "criu/remap-file-path.pb.h"
#include "lazyfs/hash.h"
#include "lazyfs/image.h"
#include "lazyfs/paths.h"
#include "prepare_marker.h"

namespace lazyfs {

struct Catalog::RawEntry {
  uint32_t id;
  Opener opener;
  std::string name;
  std::optional<uint64_t> size;
  std::optional<uint32_t> mode;
  bool has_build_id;
};

namespace {

constexpr uint32_t kFdTypeReg = 1;
constexpr uint32_t kRemapLinked = 0;
constexpr uint32_t kRemapGhost = 1;

// File systems whose files are made by the kernel, not stored: their content
// cannot be fetched from the source and would be wrong if it were.
bool on_pseudo_fs(std::string_view path) {
  for (std::string_view prefix : {"/proc/", "/sys/"}) {
    if (path.substr(0, prefix.size()) == prefix) return true;
  }
  return path == "/proc" || path == "/sys";
}

std::string type_reason(uint32_t mode) {
  switch (mode & S_IFMT) {
    case S_IFDIR:
      return "directory";
    case S_IFCHR:
    case S_IFBLK:
      return "device";
    case S_IFIFO:
      return "fifo";
    case S_IFSOCK:
      return "socket";
    case S_IFLNK:
      return "symlink";
  }
  return "unknown-type";
}

}  // namespace

Catalog Catalog::load(const std::filesystem::path& image_dir, Names names) {
  std::error_code ec;
  auto st = std::filesystem::status(image_dir, ec);
  if (ec || !std::filesystem::exists(st)) {
    throw std::runtime_error(
        fmt::format("{}: checkpoint directory does not exist", image_dir.string()));
  }
  if (!std::filesystem::is_directory(st)) {
    throw std::runtime_error(fmt::format("{}: not a directory", image_dir.string()));
  }

  Catalog cat;
  cat.image_dir_ = image_dir;

  // Remaps first: they decide which file entries are ghosts.
  std::unordered_map<uint32_t, uint32_t> remap_type_by_id;
  auto remap_path = image_dir / "remap-fpath.img";
  if (std::filesystem::exists(remap_path, ec)) {
    auto reader = ImageReader::open(remap_path, magic::kRemapFpath);
    criu::remap_file_path_entry remap;
    while (reader.next_message(remap)) {
      remap_type_by_id[remap.orig_id()] = remap.remap_type();
    }
  }

  std::string run_id;
  auto inventory_path = image_dir / "inventory.img";
  if (std::filesystem::exists(inventory_path, ec)) {
    auto reader = ImageReader::open(inventory_path, magic::kInventory);
    criu::inventory_entry inv;
    if (reader.next_message(inv)) run_id = inv.dump_criu_run_id();
  }

  const auto live = live_files_image(image_dir);
  const bool legacy = live.filename() == "reg-files.img";
  if (!std::filesystem::exists(live, ec)) {
    throw std::runtime_error(fmt::format(
        "{}: no files.img or reg-files.img: not a CRIU checkpoint directory", image_dir.string()));
  }
  // After `lazyfs prepare` the live image names paths inside the mount; the
  // original it kept has the paths the files have on the source.
  auto marker = names == Names::kOriginal ? read_prepare_marker(image_dir, live) : std::nullopt;
  cat.files_image_ = marker ? image_dir / marker->original : live;
  auto reader = ImageReader::open(cat.files_image_, legacy ? magic::kRegFiles : magic::kFiles);

  auto remap_reason = [&](uint32_t id) -> std::string {
    auto it = remap_type_by_id.find(id);
    if (it == remap_type_by_id.end()) return {};
    if (it->second == kRemapGhost) return "ghost";
    if (it->second == kRemapLinked) return "linked-remap";
    return "procfs-remap";
  };
  auto add = [&](const criu::reg_file_entry& reg) {
    RawEntry raw{reg.id(),
                 Opener{reg.id(), reg.flags(), reg.pos(), reg.mnt_id()},
                 reg.name(),
                 reg.has_size() ? std::optional(reg.size()) : std::nullopt,
                 reg.has_mode() ? std::optional(reg.mode()) : std::nullopt,
                 reg.build_id_size() > 0};
    cat.add_entry(raw, remap_reason(reg.id()));
  };

  if (legacy) {
    criu::reg_file_entry reg;
    while (reader.next_message(reg)) add(reg);
  } else {
    criu::file_entry fe;
    ImageEntry entry;
    while (reader.next(entry)) {
      reader.parse(entry, fe);
      if (fe.type() != kFdTypeReg) continue;
      if (!fe.has_reg()) {
        reader.fail(entry.offset + 4,
                    fmt::format("REG file_entry id {} has no reg_file_entry", fe.id()));
      }
      add(fe.reg());
    }
  }

  const auto& bytes = reader.bytes();
  cat.identity_ =
      Sha256()
          .update("lazyfs-checkpoint-v1")
          .update(std::string_view("\0", 1))
          .update(run_id)
          .update(std::string_view("\0", 1))
          .update(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()))
          .hex();
  return cat;
}

void Catalog::add_entry(const RawEntry& e, const std::string& remap_reason) {
  auto skip = [&](std::string reason, std::string detail) {
    skipped_.push_back({e.id, e.name, std::move(reason), std::move(detail)});
  };
  if (auto problem = path_problem(e.name)) return skip("invalid-path", *problem);

  // Without a mode (images older than the field) a recorded size is what
  // CRIU writes only for regular files.
  const bool regular = e.mode ? S_ISREG(*e.mode) : e.size.has_value();
  if (!regular) {
    if (e.mode && S_ISDIR(*e.mode)) {
      auto [it, fresh] = dir_index_.try_emplace(e.name, dirs_.size());
      if (fresh) dirs_.push_back({e.name, *e.mode, {}});
      dirs_[it->second].ids.push_back(e.id);
    }
    return skip(e.mode ? type_reason(*e.mode) : "unknown-type",
                e.mode ? "" : "no mode and no size recorded");
  }
  if (!remap_reason.empty()) {
    return skip(remap_reason, remap_reason == "ghost"
                                  ? "deleted on the source; restored from the ghost image"
                                  : "remapped by CRIU; not opened at this path");
  }
  if (on_pseudo_fs(e.name)) return skip("pseudo-fs", "kernel-made file; never fetched");

  auto [it, fresh] = file_index_.try_emplace(e.name, files_.size());
  if (fresh) {
    files_.push_back({e.name, e.size, e.mode, {e.opener}, e.has_build_id});
    return;
  }
  auto& file = files_[it->second];
  // The same path recorded with another size or type would be two different
  // files (e.g. in two mount namespaces); serve the first, report the rest.
  if (file.size != e.size || file.mode != e.mode) {
    return skip("conflict", fmt::format("same path as id {} with another size or mode",
                                        file.openers.front().id));
  }
  file.openers.push_back(e.opener);
  file.has_build_id = file.has_build_id || e.has_build_id;
}

uint64_t Catalog::total_bytes() const {
  uint64_t total = 0;
  for (const auto& f : files_) total += f.size.value_or(0);
  return total;
}

const CatalogFile* Catalog::find_file(std::string_view path) const {
  auto it = file_index_.find(std::string(path));
  return it == file_index_.end() ? nullptr : &files_[it->second];
}

bool exists_locally(const CatalogFile& file) {
  struct stat st;
  if (::stat(file.path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  return !file.size || static_cast<uint64_t>(st.st_size) == *file.size;
}

bool exists_locally(const CatalogDir& dir) {
  struct stat st;
  return ::stat(dir.path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string mode_string(uint32_t mode) {
  std::string s(10, '-');
  switch (mode & S_IFMT) {
    case S_IFDIR:
      s[0] = 'd';
      break;
    case S_IFCHR:
      s[0] = 'c';
      break;
    case S_IFBLK:
      s[0] = 'b';
      break;
    case S_IFIFO:
      s[0] = 'p';
      break;
    case S_IFSOCK:
      s[0] = 's';
      break;
    case S_IFLNK:
      s[0] = 'l';
      break;
  }
  static constexpr char kRwx[] = "rwxrwxrwx";
  for (int i = 0; i < 9; ++i) {
    if (mode & (0400u >> i)) s[static_cast<size_t>(1 + i)] = kRwx[i];
  }
  if (mode & S_ISUID) s[3] = (mode & S_IXUSR) ? 's' : 'S';
  if (mode & S_ISGID) s[6] = (mode & S_IXGRP) ? 's' : 'S';
  if (mode & S_ISVTX) s[9] = (mode & S_IXOTH) ? 't' : 'T';
  return s;
}

}  // namespace lazyfs
