#include "lazyfs/image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <cstring>

#include "lazyfs/fileio.h"

namespace lazyfs {
namespace {

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void append_u32(std::string& out, uint32_t v) {
  char b[4];
  std::memcpy(b, &v, sizeof v);
  out.append(b, sizeof b);
}

}  // namespace

ImageError::ImageError(std::filesystem::path file, uint64_t offset, const std::string& what)
    : std::runtime_error(fmt::format("{}: offset {}: {}", file.string(), offset, what)),
      file_(std::move(file)),
      offset_(offset),
      reason_(what) {}

std::string magic_name(uint32_t m) {
  switch (m) {
    case magic::kCommon:
      return "IMG_COMMON";
    case magic::kService:
      return "IMG_SERVICE";
    case magic::kInventory:
      return "INVENTORY";
    case magic::kFiles:
      return "FILES";
    case magic::kRegFiles:
      return "REG_FILES";
    case magic::kFdinfo:
      return "FDINFO";
    case magic::kRemapFpath:
      return "REMAP_FPATH";
    case magic::kGhostFile:
      return "GHOST_FILE";
  }
  return fmt::format("{:#010x}", m);
}

ImageReader ImageReader::open(const std::filesystem::path& file, uint32_t expected_magic) {
  std::vector<uint8_t> bytes;
  if (auto err = read_whole_file(file, kMaxImageBytes, bytes)) {
    throw ImageError(file, 0, err.message());
  }
  return ImageReader(file, std::move(bytes), expected_magic);
}

ImageReader ImageReader::from_bytes(std::filesystem::path file, std::vector<uint8_t> bytes,
                                    uint32_t expected_magic) {
  return ImageReader(std::move(file), std::move(bytes), expected_magic);
}

ImageReader::ImageReader(std::filesystem::path file, std::vector<uint8_t> bytes,
                         uint32_t expected_magic)
    : file_(std::move(file)), bytes_(std::move(bytes)) {
  if (bytes_.size() < 4) {
    fail(0, fmt::format("file of {} bytes is too short for an image magic", bytes_.size()));
  }
  uint32_t first = load_u32(bytes_.data());
  if (first == expected_magic) {
    header_size_ = 4;  // image version 1: no common magic
  } else if (first == magic::kCommon || first == magic::kService) {
    if (bytes_.size() < 8) fail(4, "file ends after the common magic");
    uint32_t second = load_u32(bytes_.data() + 4);
    if (second != expected_magic) {
      fail(4, fmt::format("wrong image magic {:#010x} ({}), expected {:#010x} ({})", second,
                          magic_name(second), expected_magic, magic_name(expected_magic)));
    }
    header_size_ = 8;
  } else {
    fail(0, fmt::format("wrong magic {:#010x}, expected {:#010x} ({})", first, expected_magic,
                        magic_name(expected_magic)));
  }
  pos_ = header_size_;
}

void ImageReader::fail(uint64_t offset, const std::string& what) const {
  throw ImageError(file_, offset, what);
}

bool ImageReader::next(ImageEntry& entry) {
  const size_t size = bytes_.size();
  if (pos_ == size) return false;
  if (size - pos_ < 4) {
    fail(pos_, fmt::format("truncated entry: {} bytes left, a length word needs 4", size - pos_));
  }
  const uint32_t len = load_u32(bytes_.data() + pos_);
  if (len > kMaxEntryBytes) {
    fail(pos_,
         fmt::format("entry length {} is larger than the {} bytes allowed", len, kMaxEntryBytes));
  }
  if (len > size - pos_ - 4) {
    fail(pos_, fmt::format("entry length {} runs past the end of the file ({} bytes left)", len,
                           size - pos_ - 4));
  }
  entry.offset = pos_;
  entry.payload = std::span<const uint8_t>(bytes_.data() + pos_ + 4, len);
  pos_ += 4 + static_cast<size_t>(len);
  return true;
}

std::vector<uint8_t> image_header(uint32_t image_magic) {
  std::vector<uint8_t> h(8);
  std::memcpy(h.data(), &magic::kCommon, 4);
  std::memcpy(h.data() + 4, &image_magic, 4);
  return h;
}

void write_image(const std::filesystem::path& file, std::span<const uint8_t> header,
                 const std::vector<std::string>& payloads, unsigned mode) {
  std::string out(reinterpret_cast<const char*>(header.data()), header.size());
  for (const auto& p : payloads) {
    if (p.size() > kMaxEntryBytes) {
      throw ImageError(file, out.size(), fmt::format("entry of {} bytes is too large", p.size()));
    }
    append_u32(out, static_cast<uint32_t>(p.size()));
    out += p;
  }
  if (auto err = write_file_atomic(file, out, mode)) {
    throw ImageError(file, 0, "cannot write: " + err.message());
  }
}

}  // namespace lazyfs
