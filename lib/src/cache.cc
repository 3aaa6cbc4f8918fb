// The block cache's files and their range map.
//
// A map is kept in one of two places, with the same content:
//
// - the data file's extended attribute `user.lazyfs` (version 3), where it
//   fits (up to 2 KiB) and the file system takes user attributes;
// - otherwise a .map file beside the data file (version 2, below).
//
// The attribute wins: the .map file is read only if the data file has no
// attribute. So a map moves to the attribute in one setxattr (the .map
// file left behind is removed after, at leisure), and moves to a .map file
// only once that file is durable, by removing the attribute (made durable
// before anything relies on the new map).
//
// Attribute format, version 3 (varints are protobuf's base-128 varints):
//
//   1 byte    'L'
//   1 byte    version (3)
//   varint    source_size
//   varint    1 if the source's stat follows, else 0
//   varint x5 st_mode, uid, gid, then atime and mtime zigzag-encoded
//   varint    size: the current logical size
//   varint    present ranges: count, then per range the gap from the end of
//             the one before (from 0 for the first) and its length, 0 for
//             the local tail [b, UINT64_MAX)
//   varint    local ranges: same layout
//   8 bytes   the first 8 bytes of SHA-256(checkpoint id, NUL, path, NUL,
//             every byte above): the checksum, and what ties the map to its
//             checkpoint and path (the data file's name does too)
//
// A wholly present file's map takes some 40 bytes, which ext4 keeps inside
// the inode: the file costs one inode and no block beyond its data.
//
// Map file format, version 2 (`<stem>.map`; integers little-endian):
//
//   8 bytes   magic "LZFSMAP\0"
//   u32       version (2)
//   u32 + N   checkpoint id: length, then the bytes
//   u32 + N   path (as served): length, then the bytes
//   u64       source_size: the file's size on the source when cached
//   u32       1 if the source's stat follows as known, else 0 (zeros follow)
//   u32 x 3   the source's st_mode, uid and gid when its bytes were fetched
//   i64 x 2   its atime and mtime (seconds)
//   u64       size: the current logical size (after local truncates/writes)
//   u64 + 16n present ranges: count, then n pairs (u64 begin, u64 end)
//   u64 + 16n local ranges: same layout
//   64 bytes  SHA-256 of every byte above, as lowercase hex
//
// Version 1 (the format before the stat) lacks the flag and mode to mtime
// and is read as a map whose stat is unknown.
//
// Ranges are sorted, non-empty, disjoint and non-adjacent (RangeSet's own
// form). Each lies within [0, size) except that the last may be
// [b, UINT64_MAX) with b <= size: the local tail a truncate or a write past
// the end leaves, saying that a later extension reads zeros and is never
// fetched. Local ranges lie inside present ones. Anything else, a wrong
// checkpoint id, path or source size, a bad checksum, trailing bytes or a
// data file shorter than `size`, and the map is discarded.
//
// The same checks hold for both forms.
//
// Discarding is ordered like everything else here: the map goes first (unlink
// of the .map file; an attribute goes with its data file, which is removed;
// then a directory fsync), then the data file is emptied, so no crash can
// leave a map claiming bytes that have been thrown away. For the same reason
// a .map file left without its data file is removed before a new data file
// is made.
#include "lazyfs/cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <fmt/core.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <limits>
#include <optional>
#include <string_view>

#include "cache_hooks.h"
#include "lazyfs/hash.h"
#include "lazyfs/log.h"

namespace lazyfs {

namespace cache_hooks {
void (*on_flush_step)(FlushStep step) = nullptr;
bool no_attribute_maps = false;
}  // namespace cache_hooks

namespace {

using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

constexpr std::string_view kMagic{"LZFSMAP\0", 8};
constexpr uint32_t kVersion = 2;
constexpr size_t kChecksumChars = 64;
constexpr uint64_t kMaxMapBytes = uint64_t{256} << 20;
constexpr uint64_t kEnd = std::numeric_limits<uint64_t>::max();
// Offsets and sizes must fit an off_t.
constexpr uint64_t kMaxOffset = static_cast<uint64_t>(std::numeric_limits<off_t>::max());
constexpr unsigned kFileMode = 0600;
// The map as an extended attribute of the data file.
constexpr const char* kAttrName = "user.lazyfs";
constexpr char kAttrMagic = 'L';
constexpr uint8_t kAttrVersion = 3;
constexpr size_t kAttrDigestBytes = 8;
// A longer map goes to a .map file. ext4 keeps a few dozen bytes of
// attributes inside the inode (a wholly present file's map takes some 40)
// and up to a block in one block more.
constexpr size_t kMaxAttrMap = 2048;

void flush_step(cache_hooks::FlushStep step) {
  if (cache_hooks::on_flush_step) cache_hooks::on_flush_step(step);
}

// Out of space may pass once something is evicted; other I/O errors will not.
Status io_status(std::error_code ec, const std::string& what) {
  int e = ec ? ec.value() : EIO;
  auto message = fmt::format("{}: {}", what, std::error_code(e, std::system_category()).message());
  if (e == ENOSPC || e == EDQUOT || e == EINTR || e == EAGAIN) {
    return Status::transient(e, std::move(message));
  }
  return Status::permanent(e, std::move(message));
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void put_ranges(std::string& out, const RangeSet& set) {
  put_u64(out, set.count());
  for (Range r : set.ranges()) {
    put_u64(out, r.begin);
    put_u64(out, r.end);
  }
}

struct MapContents {
  std::string checkpoint_id;
  std::string path;
  uint64_t source_size = 0;
  std::optional<SourceStat> source_stat;
  uint64_t size = 0;
  RangeSet present;
  RangeSet local;
};

std::string encode_map(const std::string& checkpoint_id, const std::string& path,
                       uint64_t source_size, const std::optional<SourceStat>& stat, uint64_t size,
                       const RangeSet& present, const RangeSet& local) {
  std::string out(kMagic);
  put_u32(out, kVersion);
  put_u32(out, static_cast<uint32_t>(checkpoint_id.size()));
  out += checkpoint_id;
  put_u32(out, static_cast<uint32_t>(path.size()));
  out += path;
  put_u64(out, source_size);
  const SourceStat st = stat.value_or(SourceStat{});
  put_u32(out, stat ? 1 : 0);
  put_u32(out, st.mode);
  put_u32(out, st.uid);
  put_u32(out, st.gid);
  put_u64(out, static_cast<uint64_t>(st.atime));
  put_u64(out, static_cast<uint64_t>(st.mtime));
  put_u64(out, size);
  put_ranges(out, present);
  put_ranges(out, local);
  out += sha256_hex(out);
  return out;
}

// Reads the body of a map; every read is bounds-checked and a short one
// leaves `ok` false.
class MapReader {
 public:
  explicit MapReader(std::string_view body) : body_(body) {}

  bool ok() const { return ok_; }
  bool at_end() const { return pos_ == body_.size(); }
  size_t remaining() const { return body_.size() - pos_; }

  std::string_view bytes(size_t n) {
    if (!ok_ || n > remaining()) {
      ok_ = false;
      return {};
    }
    auto s = body_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  uint64_t uint(size_t width) {
    auto s = bytes(width);
    uint64_t v = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      v |= uint64_t{static_cast<unsigned char>(s[i])} << (8 * i);
    }
    return v;
  }
  uint32_t u32() { return static_cast<uint32_t>(uint(4)); }
  uint64_t u64() { return uint(8); }

 private:
  std::string_view body_;
  size_t pos_ = 0;
  bool ok_ = true;
};

// Checks that `r`, range `i` of the `n` in a map's list (after one that
// ended at `prev_end`), is in RangeSet's form and inside a file of `size`
// bytes (or its local tail), and adds it to `out`.
std::optional<std::string> add_range(const char* what, Range r, uint64_t i, uint64_t n,
                                     uint64_t size, uint64_t& prev_end, RangeSet& out) {
  if (r.empty()) return fmt::format("empty {} range [{},{})", what, r.begin, r.end);
  if (i > 0 && r.begin <= prev_end) {
    return fmt::format("{} ranges unsorted or touching at [{},{})", what, r.begin, r.end);
  }
  const bool tail = r.end == kEnd && r.begin <= size && i + 1 == n;
  if (r.end > size && !tail) {
    return fmt::format("{} range [{},{}) past size {}", what, r.begin, r.end, size);
  }
  out.insert(r);
  prev_end = r.end;
  return std::nullopt;
}

std::optional<std::string> read_ranges(MapReader& in, uint64_t size, const char* what,
                                       RangeSet& out) {
  uint64_t n = in.u64();
  if (!in.ok()) return fmt::format("truncated {} count", what);
  if (n > in.remaining() / 16) return fmt::format("{} count {} overruns the file", what, n);
  uint64_t prev_end = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const Range r{in.u64(), in.u64()};
    if (auto err = add_range(what, r, i, n, size, prev_end, out)) return err;
  }
  return std::nullopt;
}

std::optional<std::string> local_outside_present(const MapContents& m) {
  for (Range r : m.local.ranges()) {
    if (!m.present.contains(r)) {
      return fmt::format("local range [{},{}) not present", r.begin, r.end);
    }
  }
  return std::nullopt;
}

// Parses and checks a map written for (checkpoint_id, path, source_size);
// the reason it cannot be used otherwise.
std::optional<std::string> decode_map(std::string_view file, const MapContents& expect,
                                      MapContents& m) {
  if (file.size() < kMagic.size() + 4 + kChecksumChars) return "shorter than a header";
  if (file.substr(0, kMagic.size()) != kMagic) return "bad magic";
  auto body = file.substr(0, file.size() - kChecksumChars);
  if (sha256_hex(body) != file.substr(body.size())) return "checksum mismatch";

  MapReader in(body);
  in.bytes(kMagic.size());
  const uint32_t version = in.u32();
  if (version != 1 && version != kVersion) return fmt::format("unknown version {}", version);
  m.checkpoint_id = std::string(in.bytes(in.u32()));
  m.path = std::string(in.bytes(in.u32()));
  m.source_size = in.u64();
  if (version >= 2) {
    const uint32_t known = in.u32();
    SourceStat st;
    st.mode = in.u32();
    st.uid = in.u32();
    st.gid = in.u32();
    st.atime = static_cast<int64_t>(in.u64());
    st.mtime = static_cast<int64_t>(in.u64());
    st.size = m.source_size;
    if (known > 1) return fmt::format("bad stat flag {}", known);
    if (known == 1) m.source_stat = st;
  }
  m.size = in.u64();
  if (!in.ok()) return "truncated header";
  if (m.checkpoint_id != expect.checkpoint_id) return "written for another checkpoint";
  if (m.path != expect.path) return fmt::format("written for another path ({})", m.path);
  if (m.source_size != expect.source_size) {
    return fmt::format("source size was {}, is {}", m.source_size, expect.source_size);
  }
  if (m.size > kMaxOffset) return fmt::format("size {} too large", m.size);
  if (auto err = read_ranges(in, m.size, "present", m.present)) return err;
  if (auto err = read_ranges(in, m.size, "local", m.local)) return err;
  if (!in.at_end()) return "trailing bytes";
  return local_outside_present(m);
}

// The attribute form of a map (see the top of this file).
std::string attribute_digest(const std::string& checkpoint_id, const std::string& path,
                             std::string_view body) {
  constexpr std::string_view kNul{"\0", 1};
  return Sha256()
      .update(checkpoint_id)
      .update(kNul)
      .update(path)
      .update(kNul)
      .update(body)
      .digest()
      .substr(0, kAttrDigestBytes);
}

void put_varint(std::string& out, uint64_t v) {
  uint8_t buf[10];
  const uint8_t* end = CodedOutputStream::WriteVarint64ToArray(v, buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(end - buf));
}

void put_attr_ranges(std::string& out, const RangeSet& set) {
  put_varint(out, set.count());
  uint64_t prev_end = 0;
  for (Range r : set.ranges()) {
    put_varint(out, r.begin - prev_end);
    put_varint(out, r.end == kEnd ? 0 : r.size());
    prev_end = r.end;
  }
}

std::string encode_attr_map(const std::string& checkpoint_id, const std::string& path,
                            uint64_t source_size, const std::optional<SourceStat>& stat,
                            uint64_t size, const RangeSet& present, const RangeSet& local) {
  std::string out{kAttrMagic, static_cast<char>(kAttrVersion)};
  put_varint(out, source_size);
  put_varint(out, stat ? 1 : 0);
  if (stat) {
    put_varint(out, stat->mode);
    put_varint(out, stat->uid);
    put_varint(out, stat->gid);
    put_varint(out, WireFormatLite::ZigZagEncode64(stat->atime));
    put_varint(out, WireFormatLite::ZigZagEncode64(stat->mtime));
  }
  put_varint(out, size);
  put_attr_ranges(out, present);
  put_attr_ranges(out, local);
  out += attribute_digest(checkpoint_id, path, out);
  return out;
}

std::optional<std::string> read_attr_ranges(CodedInputStream& in, uint64_t size, uint64_t max_count,
                                            const char* what, RangeSet& out) {
  uint64_t n = 0;
  if (!in.ReadVarint64(&n)) return fmt::format("truncated {} count", what);
  if (n > max_count) return fmt::format("{} count {} overruns the attribute", what, n);
  uint64_t prev_end = 0;
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t gap = 0, length = 0;
    if (!in.ReadVarint64(&gap) || !in.ReadVarint64(&length)) {
      return fmt::format("truncated {} range", what);
    }
    if (gap > kEnd - prev_end || (length != 0 && length > kEnd - (prev_end + gap))) {
      return fmt::format("{} range past the largest offset", what);
    }
    const uint64_t begin = prev_end + gap;
    const Range r{begin, length == 0 ? kEnd : begin + length};
    if (auto err = add_range(what, r, i, n, size, prev_end, out)) return err;
  }
  return std::nullopt;
}

std::optional<std::string> decode_attr_map(std::string_view value, const MapContents& expect,
                                           MapContents& m) {
  if (value.size() < 2 + kAttrDigestBytes) return "shorter than a header";
  if (value[0] != kAttrMagic) return "bad magic";
  if (static_cast<uint8_t>(value[1]) != kAttrVersion) {
    return fmt::format("unknown version {}", static_cast<uint8_t>(value[1]));
  }
  const auto body = value.substr(0, value.size() - kAttrDigestBytes);
  if (attribute_digest(expect.checkpoint_id, expect.path, body) != value.substr(body.size())) {
    return "checksum mismatch: damaged, or written for another checkpoint or another path";
  }
  m.checkpoint_id = expect.checkpoint_id;
  m.path = expect.path;
  CodedInputStream in(reinterpret_cast<const uint8_t*>(body.data()) + 2,
                      static_cast<int>(body.size() - 2));
  uint64_t known = 0;
  if (!in.ReadVarint64(&m.source_size) || !in.ReadVarint64(&known)) return "truncated header";
  if (known > 1) return fmt::format("bad stat flag {}", known);
  if (known == 1) {
    uint64_t mode = 0, uid = 0, gid = 0, atime = 0, mtime = 0;
    if (!in.ReadVarint64(&mode) || !in.ReadVarint64(&uid) || !in.ReadVarint64(&gid) ||
        !in.ReadVarint64(&atime) || !in.ReadVarint64(&mtime)) {
      return "truncated stat";
    }
    if (mode > UINT32_MAX || uid > UINT32_MAX || gid > UINT32_MAX) return "stat out of range";
    SourceStat st;
    st.mode = static_cast<uint32_t>(mode);
    st.uid = static_cast<uint32_t>(uid);
    st.gid = static_cast<uint32_t>(gid);
    st.atime = WireFormatLite::ZigZagDecode64(atime);
    st.mtime = WireFormatLite::ZigZagDecode64(mtime);
    st.size = m.source_size;
    m.source_stat = st;
  }
  if (!in.ReadVarint64(&m.size)) return "truncated header";
  if (m.source_size != expect.source_size) {
    return fmt::format("source size was {}, is {}", m.source_size, expect.source_size);
  }
  if (m.size > kMaxOffset) return fmt::format("size {} too large", m.size);
  if (auto err = read_attr_ranges(in, m.size, body.size(), "present", m.present)) return err;
  if (auto err = read_attr_ranges(in, m.size, body.size(), "local", m.local)) return err;
  if (in.CurrentPosition() != static_cast<int>(body.size() - 2)) return "trailing bytes";
  return local_outside_present(m);
}

// The source size a map (as read, unchecked) was written for.
std::optional<uint64_t> map_source_size(const std::vector<uint8_t>& bytes, bool in_attribute) {
  uint64_t size = 0;
  if (in_attribute) {
    CodedInputStream in(bytes.data(), static_cast<int>(bytes.size()));
    if (!in.Skip(2) || !in.ReadVarint64(&size)) return std::nullopt;
    return size;
  }
  MapReader in(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  in.bytes(kMagic.size() + 4);
  in.bytes(in.u32());
  in.bytes(in.u32());
  size = in.u64();
  if (!in.ok()) return std::nullopt;
  return size;
}

// mkdir -p with mode 0700 for every directory created, then the checks that
// make the directory safe to keep a checkpoint's file contents in.
Status make_private_dir(const std::filesystem::path& dir) {
  if (dir.empty()) return Status::permanent(EINVAL, "cache dir is empty");
  std::filesystem::path partial;
  for (const auto& part : dir) {
    partial /= part;
    if (::mkdir(partial.c_str(), 0700) != 0 && errno != EEXIST) {
      return io_status(last_errno(), fmt::format("cannot create cache dir {}", partial.string()));
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    return io_status(last_errno(), fmt::format("cannot stat cache dir {}", dir.string()));
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::permanent(ENOTDIR, fmt::format("cache dir {} is not a directory", dir.string()));
  }
  if (st.st_uid != ::geteuid()) {
    return Status::permanent(EACCES, fmt::format("cache dir {} is owned by uid {}, not by uid {}",
                                                 dir.string(), st.st_uid, ::geteuid()));
  }
  if ((st.st_mode & 077) != 0) {
    return Status::permanent(
        EACCES, fmt::format("cache dir {} is accessible by others (mode {:04o}); use a private "
                            "directory (mode 0700)",
                            dir.string(), st.st_mode & 07777));
  }
  return {};
}

// The lock on one checkpoint's caches in `dir`; see BlockCache::open.
UniqueFd lock_checkpoint(const std::filesystem::path& dir, const std::string& checkpoint_id,
                         Status& status) {
  const auto path = dir / (sha256_hex(checkpoint_id) + ".lock");
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, kFileMode));
  if (!fd) {
    status = io_status(last_errno(), fmt::format("cannot open cache lock {}", path.string()));
    return {};
  }
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) {
      status = io_status(last_errno(), fmt::format("cannot lock {}", path.string()));
      return {};
    }
    std::vector<uint8_t> raw;
    std::string holder;
    if (!read_whole_file(path, 32, raw) && !raw.empty()) {
      holder = fmt::format(" (pid {})", std::string(raw.begin(), raw.end()));
    }
    status = Status::permanent(
        EBUSY, fmt::format("cache dir {} is in use for this checkpoint by another lazyfs{}; "
                           "give each mount of it its own --cache-dir",
                           dir.string(), holder));
    return {};
  }
  const auto pid = std::to_string(::getpid());
  if (::ftruncate(fd.get(), 0) != 0 || pwrite_all(fd.get(), pid.data(), pid.size(), 0)) {
    log::debug("cache", "cannot write the pid into {}", path.string());  // the lock holds
  }
  return fd;
}

}  // namespace

// ---------------------------------------------------------------------------
// CacheFile

std::unique_ptr<CacheFile> CacheFile::open(const std::filesystem::path& base,
                                           const std::string& checkpoint_id,
                                           const std::string& path, uint64_t source_size,
                                           Status& status,
                                           const std::optional<SourceStat>& source_stat) {
  return open_with_map(base, checkpoint_id, path, source_size, read_map(base), status, source_stat);
}

CacheFile::MapRead CacheFile::read_map(const std::filesystem::path& base) {
  MapRead map;
  auto data_path = base;
  data_path += ".data";
  int err = ENOTSUP;
  if (!cache_hooks::no_attribute_maps) {
    map.bytes.resize(kMaxAttrMap);
    const ssize_t n = ::lgetxattr(data_path.c_str(), kAttrName, map.bytes.data(), kMaxAttrMap);
    err = n < 0 ? errno : 0;
    map.bytes.resize(n < 0 ? 0 : static_cast<size_t>(n));
  }
  if (err == 0 || (err != ENODATA && err != ENOTSUP && err != ENOENT)) {
    // An attribute, or one that may be there but cannot be read.
    map.in_attribute = true;
    if (err != 0) map.error = std::error_code(err, std::system_category());
    return map;
  }
  if (err == ENOENT) {
    map.error = std::make_error_code(std::errc::no_such_file_or_directory);
    return map;
  }
  auto map_path = base;
  map_path += ".map";
  map.error = read_whole_file(map_path, kMaxMapBytes, map.bytes);
  return map;
}

std::unique_ptr<CacheFile> CacheFile::open_with_map(const std::filesystem::path& base,
                                                    const std::string& checkpoint_id,
                                                    const std::string& path, uint64_t source_size,
                                                    MapRead map, Status& status,
                                                    const std::optional<SourceStat>& source_stat) {
  status = Status();
  if (source_size > kMaxOffset) {
    status = Status::permanent(EFBIG, fmt::format("{}: size {} too large", path, source_size));
    return nullptr;
  }
  std::unique_ptr<CacheFile> f(new CacheFile());
  f->data_path_ = base;
  f->data_path_ += ".data";
  f->map_path_ = base;
  f->map_path_ += ".map";
  f->checkpoint_id_ = checkpoint_id;
  f->path_ = path;
  f->source_size_ = source_size;
  f->source_stat_ = source_stat;
  {
    std::lock_guard lock(f->mutex_);
    status = f->load_map_locked(std::move(map));
  }
  if (!status.ok()) return nullptr;
  return f;
}

CacheFile::~CacheFile() {
  if (owner_) owner_->forget(this);
}

Status CacheFile::load_map_locked(MapRead map) {
  const auto& ec = map.error;
  const auto& raw = map.bytes;
  const bool have_map = ec != std::errc::no_such_file_or_directory;
  if (have_map && !map.in_attribute) {
    // A leftover of a map replacement that a crash interrupted. (Without a
    // map one can only be left by a first map that commit_map() wrote: the
    // next replacement of the map overwrites it.)
    auto tmp = map_path_;
    tmp += ".tmp-lazyfs";
    ::unlink(tmp.c_str());
  }
  std::optional<std::string> problem;
  MapContents m;
  UniqueFd data_fd;  // for the checks; it reopens when used
  if (ec) {
    if (have_map) problem = "unreadable: " + ec.message();
  } else {
    std::string_view file(reinterpret_cast<const char*>(raw.data()), raw.size());
    MapContents expect{checkpoint_id_, path_, source_size_, {}, 0, {}, {}};
    problem = map.in_attribute ? decode_attr_map(file, expect, m) : decode_map(file, expect, m);
    if (!problem) {
      data_fd = UniqueFd(::open(data_path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
      if (!data_fd) problem = "cannot open the data file: " + last_errno().message();
    }
    struct stat st;
    if (!problem && ::fstat(data_fd.get(), &st) != 0) problem = "cannot stat the data file";
    if (!problem && static_cast<uint64_t>(st.st_size) < m.size) {
      // The map is written only after the data file reached `size` durably:
      // a shorter one was replaced or cut behind our back.
      problem = fmt::format("data file holds {} bytes, map says {}", st.st_size, m.size);
    }
  }

  if (have_map && !problem) {
    // Bytes past `size` can only be from writes the map never recorded.
    if (::ftruncate(data_fd.get(), static_cast<off_t>(m.size)) != 0) {
      return io_status(last_errno(), fmt::format("cannot truncate {}", data_path_.string()));
    }
    data_exists_ = true;
    map_in_attribute_ = map.in_attribute;
    map_file_ = !map.in_attribute;
    size_ = m.size;
    present_ = std::move(m.present);
    local_ = std::move(m.local);
    adopt_source_stat_locked(m.source_stat);
    log::debug("cache", "warm path={} size={} present={} local={}", path_, size_,
               present_.bytes_in({0, size_}), local_.bytes_in({0, size_}));
    return {};
  }

  if (problem) {
    log::warn("cache", "discarding map {}={} path={} reason=\"{}\"; starting cold",
              map.in_attribute ? "attribute of" : "file",
              (map.in_attribute ? data_path_ : map_path_).string(), path_, *problem);
  }
  if (have_map) {
    // An attribute goes with its data file; a .map file might be left from
    // before it, and the attribute no longer hides it.
    for (const auto* p : {&map_path_, &data_path_}) {
      if (p == &data_path_ && !map.in_attribute) break;
      if (::unlink(p->c_str()) != 0 && errno != ENOENT) {
        return io_status(last_errno(), fmt::format("cannot remove {}", p->string()));
      }
    }
    if (auto dir_ec = fsync_dir(map_path_.parent_path())) {
      return io_status(dir_ec, fmt::format("cannot sync {}", map_path_.parent_path().string()));
    }
  }
  // Cold: the data file is made (emptied, if one is left) at the first
  // write, so a file that is never read costs no disk.
  data_exists_ = false;
  size_ = source_size_;
  present_.clear();
  local_.clear();
  // An empty file is whole from the start: its (empty) data file and a map
  // with the stat make it served without the source next time.
  if (size_ == 0 && source_stat_) {
    ++generation_;
    return ensure_data_locked();
  }
  return {};
}

// Opens the data file, reopening one that was closed, or creating that of
// a cold cache file: empty, then sparse to size_.
Status CacheFile::ensure_data_locked() {
  if (fd_) {
    if (owner_) owner_->used(this);
    return {};
  }
  UniqueFd fd;
  if (data_exists_) {
    fd = UniqueFd(::open(data_path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    if (!fd) {
      return io_status(last_errno(), fmt::format("cannot open cache file {}", data_path_.string()));
    }
  } else {
    // A .map file left without its data file (removed behind the cache's
    // back) would claim the new one's bytes: it goes first, for good.
    if (::unlink(map_path_.c_str()) == 0) {
      if (auto ec = fsync_dir(map_path_.parent_path())) {
        return io_status(ec, fmt::format("cannot sync {}", map_path_.parent_path().string()));
      }
    } else if (errno != ENOENT) {
      return io_status(last_errno(), fmt::format("cannot remove {}", map_path_.string()));
    }
    fd = UniqueFd(
        ::open(data_path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, kFileMode));
    if (!fd) {
      return io_status(last_errno(),
                       fmt::format("cannot create cache file {}", data_path_.string()));
    }
    if (::ftruncate(fd.get(), static_cast<off_t>(size_)) != 0) {
      return io_status(last_errno(), fmt::format("cannot size {}", data_path_.string()));
    }
    data_exists_ = true;
  }
  fd_ = std::make_shared<UniqueFd>(std::move(fd));
  if (owner_) owner_->opened(this);
  return {};
}

// Writes through the closed descriptor not yet flushed are made durable by a
// syncfs at the next flush, not by an fdatasync of a new descriptor, which
// would not report a write-back error that came before it was opened.
void CacheFile::close_data_locked() {
  if (!fd_) return;
  if (generation_ != flushed_generation_) closed_at_generation_ = generation_;
  fd_.reset();
}

SharedFd CacheFile::fd() {
  std::lock_guard lock(mutex_);
  if (auto st = ensure_data_locked(); !st.ok()) {
    log::error("cache", "{}", st.message());
    return nullptr;
  }
  return fd_;
}

// Fetched bytes are kept only while the source's file is the one they came
// from. A file whose mtime (or type) differs from the one recorded with its
// bytes changed on the source since: bytes fetched before the change, served
// beside bytes fetched after it, would make a file that never existed, so
// they are forgotten and fetched again (locally written bytes stay, they are
// the file's truth). A file already wholly present keeps its bytes and their
// stat: it no longer needs the source, and its copy is whole.
void CacheFile::adopt_source_stat_locked(const std::optional<SourceStat>& recorded) {
  if (!source_stat_) {
    source_stat_ = recorded;  // opened without asking the source
    return;
  }
  if (!recorded) {
    ++generation_;  // a version 1 map: record the stat
    return;
  }
  const SourceStat& now = *source_stat_;
  if (recorded->mtime == now.mtime && (recorded->mode & S_IFMT) == (now.mode & S_IFMT)) return;
  if (present_.contains({0, size_})) {
    log::info("cache",
              "path={} changed on the source (mtime {} -> {}) after it was wholly cached; "
              "keeping the cached copy",
              path_, recorded->mtime, now.mtime);
    source_stat_ = recorded;
    return;
  }
  const uint64_t dropped = present_.bytes_in({0, size_}) - local_.bytes_in({0, size_});
  log::warn("cache",
            "path={} changed on the source (mtime {} -> {}) since part of it was "
            "cached; dropping {} fetched bytes to fetch them again",
            path_, recorded->mtime, now.mtime, dropped);
  present_ = local_;
  ++generation_;
}

CacheFile::EncodedMap CacheFile::encode(uint64_t size, const RangeSet& present,
                                        const RangeSet& local) const {
  EncodedMap map;
  map.file = encode_map(checkpoint_id_, path_, source_size_, source_stat_, size, present, local);
  if (attributes_usable()) {
    map.attribute =
        encode_attr_map(checkpoint_id_, path_, source_size_, source_stat_, size, present, local);
    if (map.attribute.size() > kMaxAttrMap) map.attribute.clear();
  }
  return map;
}

CacheFile::EncodedMap CacheFile::encode_locked() const {
  return encode(size_, present_, local_);
}

bool CacheFile::attributes_usable() const {
  return !cache_hooks::no_attribute_maps && !no_attributes_ &&
         (!owner_ || owner_->attribute_maps_.load(std::memory_order_relaxed));
}

bool CacheFile::attribute_refused(int err) {
  if (err == ENOTSUP) {
    no_attributes_ = true;
    if (!owner_ || owner_->attribute_maps_.exchange(false)) {
      log::info("cache", "{} takes no user extended attributes: range maps go to .map files",
                data_path_.parent_path().string());
    }
  }
  // Too long for the file system (or no room left for attributes there).
  return err == ENOTSUP || err == E2BIG || err == ERANGE || err == ENOSPC;
}

void CacheFile::map_now_in_attribute() {
  map_in_attribute_ = true;
  if (map_file_ && ::unlink(map_path_.c_str()) != 0 && errno != ENOENT) {
    log::debug("cache", "cannot remove the old map {}: {}", map_path_.string(),
               last_errno().message());  // harmless: the attribute wins
    return;
  }
  map_file_ = false;
}

Status CacheFile::map_now_in_file(bool& removed_attribute) {
  map_file_ = true;
  removed_attribute = false;
  if (!map_in_attribute_) return {};
  if (::lremovexattr(data_path_.c_str(), kAttrName) != 0 && errno != ENODATA) {
    return io_status(last_errno(),
                     fmt::format("cannot remove the map attribute of {}", data_path_.string()));
  }
  map_in_attribute_ = false;
  removed_attribute = true;
  return {};
}

// Every byte the map calls present was written before it was encoded, and
// those writes are made durable before a map claiming them can be; then the
// map replaces the old one atomically, durably.
Status CacheFile::commit_map(int sync_fd, bool whole_fs, const EncodedMap& map) {
  const auto sync = [&] { return whole_fs ? ::syncfs(sync_fd) : ::fsync(sync_fd); };
  flush_step(cache_hooks::FlushStep::kSnapshotTaken);
  if ((whole_fs ? ::syncfs(sync_fd) : ::fdatasync(sync_fd)) != 0) {
    return io_status(last_errno(), fmt::format("cache sync for {}", data_path_.string()));
  }
  flush_step(cache_hooks::FlushStep::kDataSynced);
  if (!map.attribute.empty()) {
    if (::lsetxattr(data_path_.c_str(), kAttrName, map.attribute.data(), map.attribute.size(), 0) ==
        0) {
      if (sync() != 0) {
        return io_status(last_errno(), fmt::format("cache map sync for {}", data_path_.string()));
      }
      map_now_in_attribute();
      flush_step(cache_hooks::FlushStep::kMapWritten);
      return {};
    }
    if (const int err = errno; !attribute_refused(err)) {
      return io_status(std::error_code(err, std::system_category()),
                       fmt::format("cache map write {}", data_path_.string()));
    }
  }
  if (auto ec = write_file_atomic(map_path_, map.file, kFileMode)) {
    return io_status(ec, fmt::format("cache map write {}", map_path_.string()));
  }
  bool removed = false;
  if (Status st = map_now_in_file(removed); !st.ok()) return st;
  if (removed && sync() != 0) {
    return io_status(last_errno(), fmt::format("cache map sync for {}", data_path_.string()));
  }
  flush_step(cache_hooks::FlushStep::kMapWritten);
  return {};
}

std::optional<SourceStat> CacheFile::source_stat() const {
  std::lock_guard lock(mutex_);
  return source_stat_;
}

bool CacheFile::wholly_present() const {
  std::lock_guard lock(mutex_);
  return present_.contains({0, size_});
}

uint64_t CacheFile::size() const {
  std::lock_guard lock(mutex_);
  return size_;
}

// present() and missing() look only at bytes below size(): past the end
// nothing is missing, since nothing there can be fetched.
bool CacheFile::present(Range r) const {
  std::lock_guard lock(mutex_);
  return present_.contains({r.begin, std::min(r.end, size_)});
}

std::vector<Range> CacheFile::missing(Range r) const {
  std::lock_guard lock(mutex_);
  return present_.missing({r.begin, std::min(r.end, size_)});
}

// Counts bytes of the file, not the unbounded local tail past its end.
uint64_t CacheFile::present_bytes() const {
  std::lock_guard lock(mutex_);
  return present_.bytes_in({0, size_});
}

uint64_t CacheFile::local_bytes() const {
  std::lock_guard lock(mutex_);
  return local_.bytes_in({0, size_});
}

CacheFile::Counts CacheFile::counts() const {
  std::lock_guard lock(mutex_);
  return {size_, present_.bytes_in({0, size_}), local_.bytes_in({0, size_}),
          generation_ != flushed_generation_};
}

RangeSet CacheFile::present_set() const {
  std::lock_guard lock(mutex_);
  return present_;
}

RangeSet CacheFile::local_set() const {
  std::lock_guard lock(mutex_);
  return local_;
}

bool CacheFile::dirty() const {
  std::lock_guard lock(mutex_);
  return generation_ != flushed_generation_;
}

// Only the bytes not yet present are written. Local bytes are present, so
// they are never overwritten; and a fetched byte already present holds the
// source's value or, after a crash that lost the map's news of a local write,
// that write's value, which a second fetch must not undo either.
//
// mutex_ is held across the pwrite (local disk I/O, never network) so that
// choosing the bytes, writing them and marking them present is one step
// against write_local and truncate_local.
Status CacheFile::write_fetched(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return {};
  uint64_t end = data.size() > kEnd - offset ? kEnd : offset + data.size();
  std::lock_guard lock(mutex_);
  bool changed = false;
  Status status;
  for (Range m : present_.missing({offset, std::min(end, size_)})) {
    if (status = ensure_data_locked(); !status.ok()) break;
    if (auto ec = pwrite_all(fd_->get(), data.data() + (m.begin - offset), m.size(), m.begin)) {
      status = io_status(ec, fmt::format("cache write {} off={} len={}", path_, m.begin, m.size()));
      break;
    }
    present_.insert(m);
    changed = true;
  }
  if (changed) ++generation_;
  return status;
}

Status CacheFile::write_local(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return {};
  if (offset > kMaxOffset || data.size() > kMaxOffset - offset) {
    return Status::permanent(EFBIG, fmt::format("{}: write past the largest offset", path_));
  }
  uint64_t end = offset + data.size();
  std::lock_guard lock(mutex_);
  if (auto st = ensure_data_locked(); !st.ok()) return st;
  if (auto ec = pwrite_all(fd_->get(), data.data(), data.size(), offset)) {
    // Part of the write may have landed. Bytes that were fetched no longer
    // hold the source's value: forget them so that they are fetched again.
    // Local bytes stay local, holding old or new bytes as a failed write may.
    for (Range m : local_.missing({offset, std::min(end, size_)})) present_.erase(m);
    // Past the end the data file must stay zeros (the local tail).
    if (end > size_ && ::ftruncate(fd_->get(), static_cast<off_t>(size_)) != 0) {
      log::error("cache", "cannot trim path={} after a failed write: {}", path_,
                 last_errno().message());
    }
    ++generation_;
    return io_status(ec, fmt::format("cache write {} off={} len={}", path_, offset, end - offset));
  }
  present_.insert({offset, end});
  local_.insert({offset, end});
  if (end > size_) {
    // As for a truncate that grows the file: the hole reads zeros and nothing
    // from the old end on is ever fetched.
    present_.insert({size_, kEnd});
    local_.insert({size_, kEnd});
    size_ = end;
  }
  ++generation_;
  return {};
}

// Growing is simple: the data file is extended with zeros and everything
// from the old end on becomes local.
//
// Shrinking destroys data-file bytes that a map already on disk may claim;
// after a crash such a map would serve zeros as fetched bytes. So the map is
// replaced first, by one describing the truncated file, and only then is the
// data file cut. Both mutexes are held throughout (one fdatasync and one map
// write; shrinking is rare), so no write lands between the map and the cut,
// and no flush is half-way through a snapshot of the old size.
Status CacheFile::truncate_local(uint64_t new_size) {
  if (new_size > kMaxOffset) {
    return Status::permanent(EFBIG, fmt::format("{}: size {} too large", path_, new_size));
  }
  std::lock_guard flush_lock(flush_mutex_);
  std::lock_guard lock(mutex_);
  if (new_size == size_) return {};
  if (auto st = ensure_data_locked(); !st.ok()) return st;
  if (new_size > size_) {
    if (::ftruncate(fd_->get(), static_cast<off_t>(new_size)) != 0) {
      return io_status(last_errno(), fmt::format("cache truncate {} to {}", path_, new_size));
    }
    present_.insert({size_, kEnd});
    local_.insert({size_, kEnd});
    size_ = new_size;
    ++generation_;
    return {};
  }

  RangeSet next_present = present_;
  RangeSet next_local = local_;
  next_present.insert({new_size, kEnd});
  next_local.insert({new_size, kEnd});
  const auto map = encode(new_size, next_present, next_local);
  const bool whole_fs = closed_at_generation_ > flushed_generation_;
  if (Status status = commit_map(whole_fs ? owner_->dir_fd_.get() : fd_->get(), whole_fs, map);
      !status.ok()) {
    // The new map may or may not be in place; either is safe with the data
    // file uncut. The next flush rewrites it from the unchanged state.
    ++generation_;
    return status;
  }
  if (::ftruncate(fd_->get(), static_cast<off_t>(new_size)) != 0) {
    ++generation_;
    return io_status(last_errno(), fmt::format("cache truncate {} to {}", path_, new_size));
  }
  present_ = std::move(next_present);
  local_ = std::move(next_local);
  size_ = new_size;
  ++generation_;
  flushed_generation_ = generation_;
  return {};
}

Status CacheFile::flush() {
  std::lock_guard flush_lock(flush_mutex_);
  EncodedMap map;
  uint64_t generation = 0;
  SharedFd fd;
  bool whole_fs = false;
  {
    std::lock_guard lock(mutex_);
    if (generation_ == flushed_generation_) return {};
    generation = generation_;
    map = encode_locked();
    if (Status st = ensure_data_locked(); !st.ok()) return st;
    whole_fs = closed_at_generation_ > flushed_generation_;
    fd = whole_fs ? nullptr : fd_;
  }
  const int sync_fd = whole_fs ? owner_->dir_fd_.get() : fd->get();
  if (Status status = commit_map(sync_fd, whole_fs, map); !status.ok()) return status;
  std::lock_guard lock(mutex_);
  flushed_generation_ = generation;
  return {};
}

// ---------------------------------------------------------------------------
// BlockCache

std::unique_ptr<BlockCache> BlockCache::open(const std::filesystem::path& dir,
                                             const std::string& checkpoint_id, Status& status,
                                             size_t max_open_files) {
  status = make_private_dir(dir);
  if (!status.ok()) return nullptr;
  auto cache = std::make_unique<BlockCache>();
  cache->dir_ = dir;
  cache->dir_fd_ = UniqueFd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!cache->dir_fd_) {
    status = io_status(last_errno(), fmt::format("cannot open cache dir {}", dir.string()));
    return nullptr;
  }
  cache->checkpoint_id_ = checkpoint_id;
  cache->lock_fd_ = lock_checkpoint(dir, checkpoint_id, status);
  if (!cache->lock_fd_) return nullptr;
  if (max_open_files == 0) {
    rlimit rl{};
    const rlim_t soft = ::getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
    max_open_files = static_cast<size_t>(std::clamp<rlim_t>(soft / 4, 16, 4096));
  }
  cache->max_open_ = max_open_files;
  return cache;
}

BlockCache::~BlockCache() {
  // Files go first: they leave the open-file list, which must still exist.
  files_.clear();
}

size_t BlockCache::open_files() const {
  std::lock_guard lock(lru_mutex_);
  return lru_.size();
}

CacheFile* BlockCache::adopt(std::unique_ptr<CacheFile> f) {
  auto* raw = f.get();
  {
    std::lock_guard lock(raw->mutex_);
    raw->owner_ = this;
    if (raw->fd_) opened(raw);
  }
  files_.emplace(raw->path(), std::move(f));
  return raw;
}

void BlockCache::opened(CacheFile* f) {
  std::lock_guard lock(lru_mutex_);
  if (f->in_lru_) {
    lru_.splice(lru_.begin(), lru_, f->lru_pos_);
  } else {
    f->lru_pos_ = lru_.insert(lru_.begin(), f);
    f->in_lru_ = true;
  }
  // Close the least recently used, skipping files busy right now (their
  // mutex is held: waiting for it here could deadlock).
  auto it = lru_.end();
  while (lru_.size() > max_open_ && it != lru_.begin()) {
    CacheFile* victim = *--it;
    if (victim == f || !victim->mutex_.try_lock()) continue;
    victim->close_data_locked();
    victim->in_lru_ = false;
    it = lru_.erase(it);
    victim->mutex_.unlock();
  }
}

void BlockCache::used(CacheFile* f) {
  std::lock_guard lock(lru_mutex_);
  if (f->in_lru_) lru_.splice(lru_.begin(), lru_, f->lru_pos_);
}

void BlockCache::forget(CacheFile* f) {
  std::lock_guard lock(lru_mutex_);
  if (f->in_lru_) lru_.erase(f->lru_pos_);
  f->in_lru_ = false;
}

std::string BlockCache::stem(const std::string& path) const {
  std::string key = checkpoint_id_;
  key.push_back('\0');
  key += path;
  return sha256_hex(key);
}

CacheFile* BlockCache::file(const std::string& path, uint64_t source_size, Status& status,
                            const std::optional<SourceStat>& source_stat) {
  status = Status();
  std::lock_guard lock(mutex_);
  if (auto it = files_.find(path); it != files_.end()) {
    if (it->second->source_size() != source_size) {
      status = Status::permanent(
          EINVAL, fmt::format("cache file {} opened with size {}, asked for size {}", path,
                              it->second->source_size(), source_size));
      return nullptr;
    }
    return it->second.get();
  }
  // Opened under mutex_ so that a path is opened once; opening reads the map
  // from local disk, nothing slower.
  const auto base = dir_ / stem(path);
  CacheFile::MapRead map;
  if (no_map_.erase(path) > 0) {
    map.error = std::make_error_code(std::errc::no_such_file_or_directory);
  } else {
    map = CacheFile::read_map(base);
  }
  auto f = CacheFile::open_with_map(base, checkpoint_id_, path, source_size, std::move(map), status,
                                    source_stat);
  if (!f) return nullptr;
  return adopt(std::move(f));
}

CacheFile* BlockCache::wholly_present_file(const std::string& path,
                                           std::optional<uint64_t> source_size) {
  std::lock_guard lock(mutex_);
  if (auto it = files_.find(path); it != files_.end()) {
    CacheFile* f = it->second.get();
    const bool whole = f->source_size() == source_size.value_or(f->source_size()) &&
                       f->wholly_present() && f->source_stat();
    return whole ? f : nullptr;
  }
  const auto base = dir_ / stem(path);
  auto map = CacheFile::read_map(base);
  if (map.error) {
    // Most files of a cold cache: file() need not look again.
    if (map.error == std::errc::no_such_file_or_directory) no_map_.insert(path);
    return nullptr;
  }
  if (!source_size) {
    // The map's own, which opening it checks with everything else.
    source_size = map_source_size(map.bytes, map.in_attribute);
    if (!source_size) return nullptr;
  }
  Status status;
  auto f = CacheFile::open_with_map(base, checkpoint_id_, path, *source_size, std::move(map),
                                    status, {});
  if (!f || !f->wholly_present() || !f->source_stat()) return nullptr;
  return adopt(std::move(f));
}

// A batch holds the flush_mutex_ of each of its files from the snapshot to
// the last sync, as flush() does for one; only flush_all() holds more
// than one, and one batch runs at a time, so this cannot deadlock with a
// flush() or truncate_local() that holds one.
Status BlockCache::flush_all() {
  constexpr size_t kBatch = 1024;
  std::lock_guard batch_lock(flush_all_mutex_);
  std::vector<CacheFile*> files;
  {
    std::lock_guard lock(mutex_);
    files.reserve(files_.size());
    for (const auto& [path, f] : files_) files.push_back(f.get());
  }
  Status first;
  size_t flushed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < files.size(); i += kBatch) {
    const auto batch = std::span(files).subspan(i, std::min(kBatch, files.size() - i));
    if (Status s = flush_batch(batch, flushed); !s.ok() && first.ok()) first = std::move(s);
  }
  if (flushed > 0) {
    log::debug(
        "cache", "flushed files={} ms={:.1f}", flushed,
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return first;
}

Status BlockCache::flush_batch(std::span<CacheFile* const> files, size_t& flushed) {
  struct Pending {
    CacheFile* file;
    std::unique_lock<std::mutex> flush_lock;
    uint64_t generation = 0;
    CacheFile::EncodedMap map;
    bool in_attribute = false;  // written there, not to a .map file
    std::filesystem::path tmp;  // the .map file was written here, to be renamed
    Status status;
  };
  std::vector<Pending> pending;
  for (CacheFile* f : files) {
    std::unique_lock flush_lock(f->flush_mutex_);
    std::lock_guard lock(f->mutex_);
    if (f->generation_ == f->flushed_generation_) continue;
    Pending& p = pending.emplace_back();
    p.file = f;
    p.flush_lock = std::move(flush_lock);
    p.generation = f->generation_;
    p.map = f->encode_locked();
  }
  if (pending.empty()) return {};
  flushed += pending.size();
  flush_step(cache_hooks::FlushStep::kSnapshotTaken);

  const auto fail = [](Pending& p, std::error_code ec, std::string_view what) {
    p.status = io_status(ec, fmt::format("{} {}", what, p.file->data_path_.string()));
    log::warn("cache", "flush failed path={}: {}", p.file->path(), p.status.message());
  };
  const auto fail_all = [&](std::string_view what) {
    const auto ec = last_errno();
    for (auto& p : pending) {
      if (p.status.ok()) fail(p, ec, what);
    }
  };
  // One syncfs makes every data file of the batch durable at once (and
  // whatever else the file system holds; one call instead of an fdatasync
  // per file). Through the cache's own descriptor, open since the cache was,
  // it reports any write-back error since then, also of closed data files.
  const int dir_fd = dir_fd_.get();
  using Clock = std::chrono::steady_clock;
  const auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  const auto t0 = Clock::now();
  if (::syncfs(dir_fd) != 0) {
    fail_all("cache sync for");
    return pending.front().status;
  }
  const double data_ms = ms_since(t0);
  flush_step(cache_hooks::FlushStep::kDataSynced);

  // Then the maps. One in an attribute replaces the old one in a single
  // setxattr. A .map file that is a file's first is written where it
  // belongs: a crash can tear it, but a torn map fails its checksum and is
  // discarded, so the file starts cold, never wrong. One that replaces
  // another is written to a temporary file and renamed over the old one, so
  // a crash leaves the old map or the new one (where rename is atomic), and
  // a file that was wholly local stays so. A second syncfs makes the maps
  // durable, a third the renames (if any); one syncfs per step instead of an
  // fsync per file. A fill of many small files writes only attributes: no
  // inode beyond each data file, and no rename.
  bool renames = false;
  const auto t1 = Clock::now();
  for (Pending& p : pending) {
    CacheFile& f = *p.file;
    if (!p.map.attribute.empty() && f.attributes_usable()) {
      if (::lsetxattr(f.data_path_.c_str(), kAttrName, p.map.attribute.data(),
                      p.map.attribute.size(), 0) == 0) {
        p.in_attribute = true;
        continue;
      }
      if (const int err = errno; !f.attribute_refused(err)) {
        fail(p, std::error_code(err, std::system_category()), "cache map write");
        continue;
      }
    }
    UniqueFd fd(::open(f.map_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, kFileMode));
    if (!fd && errno == EEXIST) {
      p.tmp = f.map_path_;
      p.tmp += ".tmp-lazyfs";
      renames = true;
      fd = UniqueFd(::open(p.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, kFileMode));
    }
    if (!fd) {
      fail(p, last_errno(), "cache map write");
    } else if (auto ec = pwrite_all(fd.get(), p.map.file.data(), p.map.file.size(), 0)) {
      fail(p, ec, "cache map write");
    }
  }
  const double write_ms = ms_since(t1);
  const auto t2 = Clock::now();
  if (::syncfs(dir_fd) != 0) fail_all("cache map sync for");
  for (Pending& p : pending) {
    if (p.in_attribute) continue;
    // A first .map file that failed is removed: it may be torn.
    const auto& written = p.tmp.empty() ? p.file->map_path_ : p.tmp;
    if (p.status.ok() && !p.tmp.empty() &&
        ::rename(p.tmp.c_str(), p.file->map_path_.c_str()) != 0) {
      fail(p, last_errno(), "cache map rename");
    }
    if (!p.status.ok()) ::unlink(written.c_str());
  }
  if (renames && ::syncfs(dir_fd) != 0) fail_all("cache map sync for");
  // Where a map moved: a .map file left from before goes (the attribute
  // wins over it anyway); an attribute that would win over a new .map file
  // goes, durably, so that a truncate's map later written to a .map file is
  // never hidden by it after a crash.
  bool removed_attributes = false;
  for (Pending& p : pending) {
    if (!p.status.ok()) continue;
    if (p.in_attribute) {
      p.file->map_now_in_attribute();
      continue;
    }
    bool removed = false;
    if (Status st = p.file->map_now_in_file(removed); !st.ok()) {
      p.status = std::move(st);
    }
    removed_attributes = removed_attributes || removed;
  }
  if (removed_attributes && ::syncfs(dir_fd) != 0) fail_all("cache map sync for");
  flush_step(cache_hooks::FlushStep::kMapWritten);
  log::debug("cache", "flush batch files={} data_sync_ms={:.1f} maps_ms={:.1f} map_sync_ms={:.1f}",
             pending.size(), data_ms, write_ms, ms_since(t2));

  Status first;
  for (auto& p : pending) {
    if (p.status.ok()) {
      std::lock_guard lock(p.file->mutex_);
      p.file->flushed_generation_ = p.generation;
    } else if (first.ok()) {
      first = p.status;
    }
  }
  return first;
}

}  // namespace lazyfs
