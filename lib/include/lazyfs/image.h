// CRIU image framing: an optional common magic, a per-image magic, then
// entries of a u32 length and that many bytes of one protobuf message.
// Every length is checked against the bytes that are really there before it
// is used, so a corrupt or hostile image gives an ImageError naming the file,
// the byte offset and the fault, never a crash or an allocation sized by an
// unchecked number. Assumes little-endian images (x86, as CRIU writes them
// on x86).
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace lazyfs {

namespace magic {
inline constexpr uint32_t kCommon = 0x54564319;
inline constexpr uint32_t kService = 0x55105940;
inline constexpr uint32_t kInventory = 0x58313116;
inline constexpr uint32_t kFiles = 0x56303138;
inline constexpr uint32_t kRegFiles = 0x50363636;
inline constexpr uint32_t kFdinfo = 0x56213732;
inline constexpr uint32_t kRemapFpath = 0x59133954;
inline constexpr uint32_t kGhostFile = 0x52583605;
}  // namespace magic

// The largest single entry accepted. CRIU's entries are a few hundred bytes;
// anything near this is corruption, and refusing it bounds what one bad length
// can make us allocate or parse.
inline constexpr uint32_t kMaxEntryBytes = 16u << 20;
// The largest image file read whole into memory.
inline constexpr uint64_t kMaxImageBytes = 1ull << 30;

class ImageError : public std::runtime_error {
 public:
  ImageError(std::filesystem::path file, uint64_t offset, const std::string& what);
  const std::filesystem::path& file() const { return file_; }
  uint64_t offset() const { return offset_; }
  // "FILE: offset N: WHAT"
  const std::string& reason() const { return reason_; }

 private:
  std::filesystem::path file_;
  uint64_t offset_;
  std::string reason_;
};

struct ImageEntry {
  uint64_t offset;  // of the entry's length word in the file
  std::span<const uint8_t> payload;
};

// A whole image file in memory, positioned after its magic(s).
class ImageReader {
 public:
  // Reads `file` and checks that it starts with `expected_magic`, with or
  // without the common magic before it (image versions 2 and 1).
  static ImageReader open(const std::filesystem::path& file, uint32_t expected_magic);
  // Same, over bytes already in memory (tests, and images read elsewhere).
  static ImageReader from_bytes(std::filesystem::path file, std::vector<uint8_t> bytes,
                                uint32_t expected_magic);

  // The next entry, or false at a clean end of file. Throws ImageError for a
  // truncated length word, a zero or oversized length, or a payload that runs
  // past the end of the file.
  bool next(ImageEntry& entry);

  // Parses the next entry into `msg` (a protobuf message); false at the end.
  template <typename Message>
  bool next_message(Message& msg) {
    ImageEntry entry;
    if (!next(entry)) return false;
    parse(entry, msg);
    return true;
  }

  // Parses one entry's payload into `msg`, or fails naming the entry's offset
  // and, for a well-formed message that lacks them, the missing fields.
  template <typename Message>
  void parse(const ImageEntry& entry, Message& msg) const {
    // ParsePartial and our own check, not Parse: protobuf would log the
    // missing fields to stderr itself, and the caller's message says it better.
    if (!msg.ParsePartialFromArray(entry.payload.data(), static_cast<int>(entry.payload.size()))) {
      fail(entry.offset + 4, "entry of " + std::to_string(entry.payload.size()) +
                                 " bytes is not a valid " + msg.GetDescriptor()->name() +
                                 " protobuf");
    }
    if (!msg.IsInitialized()) {
      fail(entry.offset + 4, "entry of " + std::to_string(entry.payload.size()) +
                                 " bytes is not a valid " + msg.GetDescriptor()->name() +
                                 " protobuf: missing " + msg.InitializationErrorString());
    }
  }

  const std::filesystem::path& file() const { return file_; }
  const std::vector<uint8_t>& bytes() const { return bytes_; }
  // Length of the magic header, which writers copy to keep the image version.
  size_t header_size() const { return header_size_; }
  [[noreturn]] void fail(uint64_t offset, const std::string& what) const;

 private:
  ImageReader(std::filesystem::path file, std::vector<uint8_t> bytes, uint32_t expected_magic);

  std::filesystem::path file_;
  std::vector<uint8_t> bytes_;
  size_t header_size_ = 0;
  size_t pos_ = 0;
};

// Writes an image atomically: `header` (the magic words), then each payload
// framed with its length, to a temporary file that is fsynced and renamed over
// `file`, and the directory fsynced. `mode` is the new file's permission bits.
void write_image(const std::filesystem::path& file, std::span<const uint8_t> header,
                 const std::vector<std::string>& payloads, unsigned mode = 0644);

// The header CRIU 3.x/4.x writes: the common magic, then `image_magic`.
std::vector<uint8_t> image_header(uint32_t image_magic);

std::string magic_name(uint32_t magic);

}  // namespace lazyfs
