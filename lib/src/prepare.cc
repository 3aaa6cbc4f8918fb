#include "lazyfs/prepare.h"

#include <fmt/core.h>

#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "criu/fdinfo.pb.h"
#include "criu/regfile.pb.h"
#include "lazyfs/catalog.h"
#include "lazyfs/fileio.h"
#include "lazyfs/hash.h"
#include "lazyfs/image.h"
#include "lazyfs/paths.h"
#include "prepare_marker.h"

namespace lazyfs {
namespace {

std::string as_string(const std::vector<uint8_t>& bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

void write_or_throw(const std::filesystem::path& file, std::string_view data) {
  if (auto ec = write_file_atomic(file, data, 0644)) {
    throw std::runtime_error(fmt::format("{}: cannot write: {}", file.string(), ec.message()));
  }
}

// The image with the names in `redirect` moved under `mountpoint`. Entries of
// other kinds and names not redirected keep their bytes exactly.
std::string rewrite(const ImageReader& original, bool legacy, const std::set<std::string>& redirect,
                    const std::string& mountpoint, PrepareResult& result) {
  ImageReader reader = original;
  const auto& bytes = reader.bytes();
  std::string out(reinterpret_cast<const char*>(bytes.data()), reader.header_size());
  auto append = [&](std::string_view payload) {
    auto len = static_cast<uint32_t>(payload.size());
    out.append(reinterpret_cast<const char*>(&len), sizeof len);
    out.append(payload);
  };
  auto redirected = [&](criu::reg_file_entry& reg) {
    if (!redirect.count(reg.name())) return false;
    if (reg.mnt_id() != -1) {
      ++result.foreign_mounts;  // relative to another mount's root: not ours to move
      return false;
    }
    reg.set_name(mountpoint + reg.name());
    return true;
  };
  ImageEntry entry;
  while (reader.next(entry)) {
    std::string_view raw(reinterpret_cast<const char*>(entry.payload.data()), entry.payload.size());
    if (legacy) {
      criu::reg_file_entry reg;
      reader.parse(entry, reg);
      append(redirected(reg) ? reg.SerializeAsString() : std::string(raw));
    } else {
      criu::file_entry fe;
      reader.parse(entry, fe);
      const bool moved = fe.type() == 1 && fe.has_reg() && redirected(*fe.mutable_reg());
      append(moved ? fe.SerializeAsString() : std::string(raw));
    }
  }
  return out;
}

}  // namespace

PrepareResult prepare_checkpoint(const std::filesystem::path& image_dir,
                                 const PrepareOptions& options) {
  std::string mountpoint = options.mountpoint;
  while (mountpoint.size() > 1 && mountpoint.back() == '/') mountpoint.pop_back();
  if (auto problem = path_problem(mountpoint)) {
    throw std::runtime_error(fmt::format("mount point {}: {}", options.mountpoint, *problem));
  }
  if (mountpoint == "/") throw std::runtime_error("mount point must not be /");

  const Catalog cat = Catalog::load(image_dir);  // the original names, prepared or not
  const auto live = live_files_image(image_dir);
  const bool legacy = live.filename() == "reg-files.img";
  auto marker = read_prepare_marker(image_dir, live);

  PrepareResult result;
  std::set<std::string> redirect;
  for (const auto& f : cat.files()) {
    if (options.all || !exists_locally(f)) {
      redirect.insert(f.path);
    } else {
      ++result.left_alone;
    }
  }
  for (const auto& d : cat.dirs()) {
    if (!exists_locally(d)) redirect.insert(d.path);
  }

  const auto orig_path = std::filesystem::path(live.string() + kOriginalSuffix);
  auto original =
      ImageReader::open(marker ? orig_path : live, legacy ? magic::kRegFiles : magic::kFiles);
  const std::string rewritten = rewrite(original, legacy, redirect, mountpoint, result);
  for (const auto& f : cat.files()) {
    if (redirect.count(f.path)) ++result.files_redirected;
  }
  result.dirs_redirected = redirect.size() - result.files_redirected;

  const std::string digest = sha256_hex(rewritten);
  if (marker && marker->rewritten_sha256 == digest) return result;  // already so
  result.changed = true;

  // Order matters for a crash at any step: the original is safe before the
  // marker names it, and the marker is written before the image it describes,
  // so a marker that does not match the live image is simply ignored.
  if (!marker) write_or_throw(orig_path, as_string(original.bytes()));
  write_prepare_marker(image_dir, {mountpoint, options.all, digest, orig_path.filename()});
  write_or_throw(live, rewritten);
  return result;
}

bool undo_prepare(const std::filesystem::path& image_dir) {
  const auto live = live_files_image(image_dir);
  auto marker = read_prepare_marker(image_dir, live);
  if (!marker) return false;
  const auto orig_path = std::filesystem::path(live.string() + kOriginalSuffix);
  std::vector<uint8_t> bytes;
  if (auto ec = read_whole_file(orig_path, kMaxImageBytes, bytes)) {
    throw std::runtime_error(
        fmt::format("{}: cannot read the original: {}", orig_path.string(), ec.message()));
  }
  write_or_throw(live, as_string(bytes));
  std::error_code ec;
  std::filesystem::remove(image_dir / kPrepareMarker, ec);
  std::filesystem::remove(orig_path, ec);
  return true;
}

}  // namespace lazyfs
