// SftpSource speaks SFTP version 3 (draft-ietf-secsh-filexfer-02) itself over
// an SSH channel (ssh_channel.h: OpenSSH's ssh client, or libssh2) instead of
// using libssh2's sftp_* calls or libcurl.
//
// Why: libcurl's SFTP goes through libssh2's sftp_read, which reads ahead up
// to four times the caller's buffer past the end of the asked range. Measured
// on Debian 12 (libssh2 1.10, OpenSSH 9.2 sftp-server "bytes read"): a 4 KiB
// range cost 16 KiB at the server, a 64 KiB range 95-270 KB, a 1 MiB range
// 1.08-1.32 MB, depending on CURLOPT_BUFFERSIZE. Lazily served checkpoint
// files are read in small scattered ranges, so that over-read would multiply
// the traffic. With our own READ requests the server reads exactly the bytes
// asked for, and we choose the pipelining depth.
//
// Lock order: mu_ (the pool) and known_hosts_mu_ are never held together and
// never across network I/O; a checked-out Session is owned by one thread.
#include "lazyfs/sftp_source.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "lazyfs/fileio.h"
#include "lazyfs/log.h"
#include "sftp_hooks.h"
#include "ssh_channel.h"

namespace lazyfs {

namespace sftp_hooks {
std::atomic<bool> mispredict_handles{false};
}  // namespace sftp_hooks
namespace detail {

std::string errno_text(int errnum) {
  return std::system_category().message(errnum);
}

}  // namespace detail

namespace {

using detail::SshChannel;
using detail::SshSettings;

constexpr std::string_view kLog = "sftp";

// SFTP v3 packet types, status codes, open flags and attribute flags.
constexpr uint8_t kFxpInit = 1;
constexpr uint8_t kFxpVersion = 2;
constexpr uint8_t kFxpOpen = 3;
constexpr uint8_t kFxpClose = 4;
constexpr uint8_t kFxpRead = 5;
constexpr uint8_t kFxpFstat = 8;
constexpr uint8_t kFxpOpendir = 11;
constexpr uint8_t kFxpReaddir = 12;
constexpr uint8_t kFxpStat = 17;
constexpr uint8_t kFxpStatus = 101;
constexpr uint8_t kFxpHandle = 102;
constexpr uint8_t kFxpData = 103;
constexpr uint8_t kFxpName = 104;
constexpr uint8_t kFxpAttrs = 105;

constexpr uint32_t kFxOk = 0;
constexpr uint32_t kFxEof = 1;
constexpr uint32_t kFxNoSuchFile = 2;
constexpr uint32_t kFxPermissionDenied = 3;
constexpr uint32_t kFxNoConnection = 6;
constexpr uint32_t kFxConnectionLost = 7;
constexpr uint32_t kFxOpUnsupported = 8;

constexpr uint32_t kFxfRead = 0x1;

constexpr uint32_t kAttrSize = 0x1;
constexpr uint32_t kAttrUidGid = 0x2;
constexpr uint32_t kAttrPermissions = 0x4;
constexpr uint32_t kAttrAcModTime = 0x8;
constexpr uint32_t kAttrExtended = 0x80000000;

constexpr uint32_t kSftpVersion = 3;

// A READ asks for at most this much. OpenSSH's sftp-server answers up to
// 261120 bytes per READ; smaller requests keep the first chunk of a range
// early and the pipeline full.
constexpr uint32_t kReadRequest = 64 * 1024;
// READs outstanding at once on one session: 2 MiB in flight covers the
// bandwidth-delay product of a LAN and keeps loopback CPU-bound.
constexpr size_t kReadsInFlight = 32;
// Files open at once on one session when many small ranges are read together
// (read_many): their OPENs go out back to back, so a batch of small files
// costs about one round trip, not two per file.
constexpr size_t kFilesInFlight = 32;
// The largest reply we accept: a DATA of 261120 bytes and its header, with
// room to spare. Anything larger is a broken stream.
constexpr uint32_t kMaxReply = 1024 * 1024;
constexpr size_t kReceiveBuffer = 2 * kMaxReply;

// The bracketed form OpenSSH and URIs use for an IPv6 address.
std::string host_for_uri(const std::string& host) {
  return host.find(':') != std::string::npos ? "[" + host + "]" : host;
}

struct Passwd {
  std::string name;
  std::string home;
};

Passwd current_passwd() {
  Passwd out;
  std::array<char, 4096> buf{};
  struct passwd pw {};
  struct passwd* found = nullptr;
  if (::getpwuid_r(::getuid(), &pw, buf.data(), buf.size(), &found) == 0 && found) {
    out.name = found->pw_name ? found->pw_name : "";
    out.home = found->pw_dir ? found->pw_dir : "";
  }
  return out;
}

// Builds outgoing SFTP packets: uint32 length, byte type, then fields, all
// big-endian. Several packets may be queued and sent in one write.
class Outgoing {
 public:
  void begin(uint8_t type) {
    start_ = buf_.size();
    u32(0);
    u8(type);
  }
  void end() {
    auto len = static_cast<uint32_t>(buf_.size() - start_ - 4);
    for (size_t i = 0; i < 4; ++i) {
      buf_[start_ + i] = static_cast<char>((len >> (24 - 8 * i)) & 0xff);
    }
  }
  void u8(uint8_t v) { buf_.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) u8(static_cast<uint8_t>((v >> shift) & 0xff));
  }
  void u64(uint64_t v) {
    u32(static_cast<uint32_t>(v >> 32));
    u32(static_cast<uint32_t>(v & 0xffffffff));
  }
  void str(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    buf_.append(s);
  }
  std::span<const std::byte> bytes() const { return std::as_bytes(std::span(buf_)); }
  bool empty() const { return buf_.empty(); }
  void clear() { buf_.clear(); }

 private:
  std::string buf_;
  size_t start_ = 0;
};

// Reads big-endian fields from a received packet; ok() turns false, for
// good, once a field runs past the end.
class Fields {
 public:
  explicit Fields(std::span<const std::byte> data) : rest_(data) {}
  bool ok() const { return ok_; }
  size_t left() const { return rest_.size(); }
  uint8_t u8() {
    auto b = take(1);
    return b.empty() ? 0 : static_cast<uint8_t>(b[0]);
  }
  uint32_t u32() {
    auto b = take(4);
    uint32_t v = 0;
    for (auto x : b) v = (v << 8) | static_cast<uint8_t>(x);
    return v;
  }
  uint64_t u64() {
    uint64_t hi = u32();
    return (hi << 32) | u32();
  }
  std::span<const std::byte> bytes() { return take(u32()); }
  std::string str() {
    auto b = bytes();
    return {reinterpret_cast<const char*>(b.data()), b.size()};
  }

 private:
  std::span<const std::byte> take(size_t n) {
    if (!ok_ || n > rest_.size()) {
      ok_ = false;
      return {};
    }
    auto out = rest_.first(n);
    rest_ = rest_.subspan(n);
    return out;
  }

  std::span<const std::byte> rest_;
  bool ok_ = true;
};

// Parses an ATTRS; `flags` says which fields it had.
bool parse_attrs(Fields& f, SourceStat& out, uint32_t* flags_out = nullptr) {
  uint32_t flags = f.u32();
  if (flags_out) *flags_out = flags;
  if (flags & kAttrSize) out.size = f.u64();
  if (flags & kAttrUidGid) {
    out.uid = f.u32();
    out.gid = f.u32();
  }
  if (flags & kAttrPermissions) out.mode = f.u32();
  if (flags & kAttrAcModTime) {
    out.atime = f.u32();
    out.mtime = f.u32();
  }
  if (flags & kAttrExtended) {
    uint32_t count = f.u32();
    for (uint32_t i = 0; i < count && f.ok(); ++i) {
      f.bytes();
      f.bytes();
    }
  }
  return f.ok();
}

// A READ covering [offset, offset + length), re-sent for the rest after a
// short DATA; `held` keeps bytes that arrived before those in front.
struct PendingRead {
  uint32_t id = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  uint32_t received = 0;
  std::vector<std::byte> held;
  bool done = false;
  bool eof = false;
};

// One range of one file being read: its OPEN (unless the session has the file
// open already), its READs and its CLOSE.
struct Transfer {
  enum class Step { kWaiting, kOpening, kReading, kDone };
  Transfer(std::string remote_path, uint64_t offset, uint64_t length, const ChunkSink& s)
      : remote(std::move(remote_path)),
        begin(offset),
        end(length > UINT64_MAX - offset ? UINT64_MAX : offset + length),
        next(offset),
        sink(&s) {}

  std::string remote;
  uint64_t begin;  // the first byte wanted
  uint64_t end;    // one past the last byte wanted
  uint64_t next;   // the first byte not yet asked for
  const ChunkSink* sink;
  Step step = Step::kWaiting;
  bool keep = false;  // the session keeps the file open afterwards
  uint32_t open_id = 0;
  std::string handle;
  // The handle the OPEN is expected to get (see Session::read): its FSTAT
  // and READs go out with the OPEN, `speculating` until its reply says.
  std::string predicted;
  bool speculating = false;
  std::deque<PendingRead> reads;     // READs not yet handed on, in offset order
  bool eof = false;                  // a READ met the end: ask for nothing further
  bool past_end = false;             // the front met the end: deliver nothing further
  Status failure;                    // the server refused the OPEN or a READ
  uint64_t delivered = 0;            // bytes handed to the sink
  std::optional<SourceStat> expect;  // checked by an FSTAT ahead of the READs
  bool checked = false;              // that FSTAT was sent
  uint32_t fstat_id = 0;             // and is unanswered
};

// One SSH session with one SFTP channel. Not thread-safe: owned by whoever
// checked it out of the pool.
class Session {
 public:
  // `predict_handles` is the pool's: whether OPENs get the handle that
  // read() predicts (see there); cleared when a server's do not.
  Session(const SshSettings& settings, std::atomic<bool>& predict_handles)
      : s_(settings), predict_handles_(predict_handles) {}
  ~Session() {
    if (broken_ && channel_) channel_->abandon();
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // A session that saw a socket, time-out or protocol error: its stream is in
  // an unknown state and must not be used again.
  bool broken() const { return broken_; }
  void mark_broken() { broken_ = true; }
  uint64_t take_writes() { return std::exchange(writes_, 0); }
  uint64_t take_predicted() { return std::exchange(predicted_, 0); }
  bool timed_out() const { return timed_out_; }

  Status connect(std::mutex& known_hosts_mu);
  Status stat(const std::string& remote, SourceStat& out);
  // Pipelined STATs; marks each answered index (answers carry their own
  // status) and returns what stopped the session, if anything did.
  Status stat_many(const std::vector<std::string>& remotes, std::vector<bool>& answered,
                   const Source::StatDone& done);
  // `delivered` counts the bytes handed to `sink`, even on failure.
  Status read(const std::string& remote, uint64_t offset, uint64_t length, const ChunkSink& sink,
              const std::optional<SourceStat>& expect, uint64_t& delivered);
  // Many ranges, pipelined; `done` runs for each transfer that ends. A
  // non-ok return means the session broke: transfers without `done` are
  // left to the caller.
  Status read_many(std::span<Transfer> transfers, const Source::ReadDone& done);

 private:
  struct Reply {
    uint8_t type = 0;
    uint32_t id = 0;
    std::span<const std::byte> body;  // after the id; valid until the next receive
  };

  Status start_sftp();

  Status channel_error(Status st);
  Status protocol_error(const std::string& what);
  Status status_error(Fields& f, const std::string& remote);

  Status send(const Outgoing& out);
  Status fill(size_t need);
  Status receive(Reply& reply);
  Status receive_any(Reply& reply);
  Status absorb_close(const Reply& reply);
  bool reply_buffered();
  size_t drop_speculation(Transfer& t, std::unordered_map<uint32_t, size_t>& owner);
  Status call(const Outgoing& out, uint32_t id, Reply& reply);

  Status run_transfers(std::span<Transfer> transfers, const std::vector<std::string>& close_first,
                       const Source::ReadDone& done);
  Status on_read_reply(Transfer& t, const Reply& reply);
  void deliver_front(Transfer& t);
  void queue_read(Outgoing& out, const std::string& handle, const PendingRead& p);
  uint32_t queue(Outgoing& out, uint8_t type, std::string_view arg);
  void queue_close(Outgoing& out, const std::string& handle);

  const SshSettings& s_;
  std::unique_ptr<SshChannel> channel_;
  bool broken_ = false;
  bool timed_out_ = false;
  uint64_t writes_ = 0;     // sends since take_writes()
  uint64_t predicted_ = 0;  // OPENs whose handle read() predicted, since take_predicted()
  std::atomic<bool>& predict_handles_;
  uint32_t next_id_ = 1;
  std::string open_path_;    // the file kept open since the last read, if any
  std::string open_handle_;  // its SFTP handle
  std::unordered_set<uint32_t> unanswered_closes_;  // CLOSEs whose reply is not read yet
  std::unordered_set<uint32_t> discarded_;          // requests whose reply is read and dropped
  std::vector<std::byte> rbuf_;
  size_t rpos_ = 0;
  size_t rend_ = 0;
};

Status Session::channel_error(Status st) {
  broken_ = true;
  timed_out_ = st.errnum() == ETIMEDOUT;
  return st;
}

Status Session::protocol_error(const std::string& what) {
  broken_ = true;
  return Status::transient(EIO, fmt::format("SFTP protocol error on {}: {}", s_.login, what));
}

Status Session::status_error(Fields& f, const std::string& remote) {
  uint32_t code = f.u32();
  std::string msg = f.str();
  if (!f.ok()) return protocol_error("truncated STATUS");
  auto where = fmt::format("{} on {}", remote, s_.login);
  switch (code) {
    case kFxNoSuchFile:
      return Status::permanent(ENOENT, fmt::format("{}: no such file", where));
    case kFxPermissionDenied:
      return Status::permanent(EACCES, fmt::format("{}: permission denied", where));
    case kFxOpUnsupported:
      return Status::permanent(EOPNOTSUPP, fmt::format("{}: operation not supported", where));
    case kFxNoConnection:
    case kFxConnectionLost:
      broken_ = true;
      return Status::transient(ECONNRESET, fmt::format("{}: {}", where, msg));
    case kFxEof:
      return Status::permanent(EIO, fmt::format("{}: unexpected end of file", where));
    default:
      return Status::permanent(EIO,
                               fmt::format("{}: server says \"{}\" (code {})", where, msg, code));
  }
}

Status Session::connect(std::mutex& known_hosts_mu) {
  if (s_.client == SshClient::kLibssh2) {
    auto st = detail::open_libssh2_channel(s_, known_hosts_mu, channel_);
    if (!st.ok()) return channel_error(std::move(st));
    return start_sftp();
  }
  // ssh appends a new host key itself: under accept-new, sessions connect
  // one at a time until their VERSION (the key is settled by then), or two
  // of them could add the same key twice.
  std::unique_lock lock(known_hosts_mu, std::defer_lock);
  if (s_.policy == HostKeyPolicy::kAcceptNew) lock.lock();
  auto st = detail::open_openssh_channel(s_, channel_);
  if (!st.ok()) return channel_error(std::move(st));
  return start_sftp();
}

Status Session::start_sftp() {
  rbuf_.resize(kReceiveBuffer);
  Outgoing init;
  init.begin(kFxpInit);
  init.u32(kSftpVersion);
  init.end();
  auto st = send(init);
  if (!st.ok()) return st;
  // VERSION carries no request id: read it by hand.
  st = fill(5);
  if (!st.ok()) return st;
  Fields head(std::span<const std::byte>(rbuf_).subspan(rpos_, 5));
  uint32_t len = head.u32();
  uint8_t type = head.u8();
  if (type != kFxpVersion || len < 5 || len > kMaxReply) {
    return protocol_error("no VERSION reply to INIT");
  }
  st = fill(4 + size_t{len});
  if (!st.ok()) return st;
  Fields body(std::span<const std::byte>(rbuf_).subspan(rpos_ + 5, len - 1));
  uint32_t version = body.u32();
  rpos_ += 4 + size_t{len};
  if (version < kSftpVersion) {
    broken_ = true;
    return Status::permanent(EPROTO, fmt::format("{} speaks SFTP version {}, we need {}", s_.login,
                                                 version, kSftpVersion));
  }
  return {};
}

Status Session::send(const Outgoing& out) {
  ++writes_;
  auto st = channel_->write(out.bytes());
  return st.ok() ? st : channel_error(std::move(st));
}

// Makes `need` bytes from rpos_ available in rbuf_.
Status Session::fill(size_t need) {
  if (rend_ - rpos_ >= need) return {};
  if (rpos_ + need > rbuf_.size()) {
    std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
  }
  while (rend_ - rpos_ < need) {
    size_t got = 0;
    auto st = channel_->read(std::span(rbuf_).subspan(rend_), got);
    if (!st.ok()) return channel_error(std::move(st));
    rend_ += got;
  }
  return {};
}

// The next reply that is not a CLOSE's: CLOSE replies are read whenever they
// come (see queue_close).
Status Session::receive(Reply& reply) {
  while (true) {
    auto st = receive_any(reply);
    if (!st.ok()) return st;
    if (discarded_.erase(reply.id) > 0) continue;
    if (!unanswered_closes_.contains(reply.id)) return {};
    if (st = absorb_close(reply); !st.ok()) return st;
  }
}

Status Session::absorb_close(const Reply& reply) {
  unanswered_closes_.erase(reply.id);
  Fields f(reply.body);
  if (reply.type != kFxpStatus) {
    return protocol_error(fmt::format("CLOSE answered by {}", reply.type));
  }
  if (f.u32() != kFxOk) log::debug(kLog, "close failed endpoint={}", s_.endpoint);
  return {};
}

// Whether receive() has a reply without reading from the channel: a whole
// one other than a CLOSE's or a dropped request's is in the buffer (those in
// front of it are taken on the way). A bad one counts, for receive() to
// report.
bool Session::reply_buffered() {
  while (rend_ - rpos_ >= 9) {
    Fields head(std::span<const std::byte>(rbuf_).subspan(rpos_, 9));
    const uint32_t len = head.u32();
    head.u8();
    const uint32_t id = head.u32();
    if (len < 5 || len > kMaxReply) return true;
    if (rend_ - rpos_ < 4 + size_t{len}) return false;
    if (!unanswered_closes_.contains(id) && !discarded_.contains(id)) return true;
    Reply reply;
    if (!receive_any(reply).ok()) return true;
    if (discarded_.erase(reply.id) > 0) continue;
    if (!absorb_close(reply).ok()) return true;
  }
  return false;
}

Status Session::receive_any(Reply& reply) {
  auto st = fill(4);
  if (!st.ok()) return st;
  Fields head(std::span<const std::byte>(rbuf_).subspan(rpos_, 4));
  uint32_t len = head.u32();
  if (len < 5 || len > kMaxReply) return protocol_error(fmt::format("reply of {} bytes", len));
  st = fill(4 + size_t{len});
  if (!st.ok()) return st;
  Fields f(std::span<const std::byte>(rbuf_).subspan(rpos_ + 4, len));
  reply.type = f.u8();
  reply.id = f.u32();
  reply.body = std::span<const std::byte>(rbuf_).subspan(rpos_ + 9, len - 5);
  rpos_ += 4 + size_t{len};
  return {};
}

Status Session::call(const Outgoing& out, uint32_t id, Reply& reply) {
  auto st = send(out);
  if (!st.ok()) return st;
  st = receive(reply);
  if (!st.ok()) return st;
  if (reply.id != id)
    return protocol_error(fmt::format("reply to {} while waiting for {}", reply.id, id));
  return {};
}

// stat_many() lists a directory instead of asking for each of its files when
// it wants at least this many of them: one READDIR answers about a hundred
// (OpenSSH's sftp-server lstat()s each entry), so validating the 5,000 files
// of a checkpoint costs a few hundred requests, not 5,000.
constexpr size_t kListAtLeast = 8;
// It stops listing after this many entries per file it wants, and asks for
// the files still missing one by one: a large directory whose files are
// mostly not wanted is not read whole.
constexpr size_t kListedPerWanted = 4;

// An entry of a directory listing answers for a file if it says all that a
// STAT would: size, owner, mode with type, times. A symlink does not (STAT
// follows it).
bool answers_stat(uint32_t flags, const SourceStat& st) {
  constexpr uint32_t kNeeded = kAttrSize | kAttrUidGid | kAttrPermissions | kAttrAcModTime;
  return (flags & kNeeded) == kNeeded && (st.mode & S_IFMT) != 0 && !S_ISLNK(st.mode);
}

Status Session::stat_many(const std::vector<std::string>& remotes, std::vector<bool>& answered,
                          const Source::StatDone& done) {
  constexpr size_t kStatsInFlight = 64;
  constexpr size_t kListsInFlight = 8;
  // A directory listed for the files of it that are wanted.
  struct Listing {
    std::string dir;
    std::unordered_map<std::string, size_t> wanted;  // entry name -> index
    size_t limit = 0;                                // entries to read at most
    size_t listed = 0;
    std::string handle;
  };
  std::vector<Listing> listings;
  std::deque<size_t> to_stat;
  {
    std::unordered_map<std::string_view, std::vector<size_t>> by_dir;
    for (size_t i = 0; i < remotes.size(); ++i) {
      if (answered[i]) continue;
      const std::string_view r = remotes[i];
      const size_t slash = r.rfind('/');
      const std::string_view name = slash == std::string_view::npos ? r : r.substr(slash + 1);
      if (slash == std::string_view::npos || name.empty() || name == "." || name == "..") {
        to_stat.push_back(i);
      } else {
        by_dir[r.substr(0, slash)].push_back(i);
      }
    }
    for (auto& [dir, files] : by_dir) {
      if (files.size() < kListAtLeast) {
        to_stat.insert(to_stat.end(), files.begin(), files.end());
        continue;
      }
      Listing l;
      l.dir = dir.empty() ? "/" : std::string(dir);
      for (size_t i : files) {
        // A path asked for twice: the listing answers once, a STAT the other.
        if (!l.wanted.emplace(remotes[i].substr(dir.size() + 1), i).second) to_stat.push_back(i);
      }
      l.limit = kListedPerWanted * files.size();
      listings.push_back(std::move(l));
    }
  }
  // What each reply answers.
  enum class For { kStat, kOpendir, kReaddir };
  std::unordered_map<uint32_t, std::pair<For, size_t>> owner;
  size_t next_listing = 0;
  size_t stats_in_flight = 0;
  size_t lists_in_flight = 0;
  Outgoing out;
  Reply reply;
  const auto send_readdir = [&](size_t k) {
    owner[queue(out, kFxpReaddir, listings[k].handle)] = {For::kReaddir, k};
  };
  // The listing ended (read, cut short or refused): its files not found in
  // it are asked for one by one, which also gives a missing one its error.
  const auto end_listing = [&](size_t k) {
    Listing& l = listings[k];
    if (!l.handle.empty()) queue_close(out, l.handle);
    for (const auto& [name, i] : l.wanted) to_stat.push_back(i);
    l.wanted.clear();
    --lists_in_flight;
  };
  while (true) {
    for (; next_listing < listings.size() && lists_in_flight < kListsInFlight; ++next_listing) {
      owner[queue(out, kFxpOpendir, listings[next_listing].dir)] = {For::kOpendir, next_listing};
      ++lists_in_flight;
    }
    while (!to_stat.empty() && stats_in_flight < kStatsInFlight) {
      owner[queue(out, kFxpStat, remotes[to_stat.front()])] = {For::kStat, to_stat.front()};
      to_stat.pop_front();
      ++stats_in_flight;
    }
    if (!out.empty()) {
      auto st = send(out);
      out.clear();
      if (!st.ok()) return st;
    }
    if (owner.empty()) break;

    do {  // the replies already here, before their requests go out (run_transfers)
      auto st = receive(reply);
      if (!st.ok()) return st;
      auto o = owner.find(reply.id);
      if (o == owner.end()) {
        return protocol_error(fmt::format("reply to unknown request {}", reply.id));
      }
      const auto [what, at] = o->second;
      owner.erase(o);
      Fields f(reply.body);
      switch (what) {
        case For::kStat: {
          --stats_in_flight;
          SourceStat attrs;
          Status result;
          if (reply.type == kFxpStatus) {
            result = status_error(f, remotes[at]);
            if (broken_) return result;
          } else if (reply.type != kFxpAttrs || !parse_attrs(f, attrs)) {
            return protocol_error(fmt::format("STAT answered by {}", reply.type));
          }
          answered[at] = true;
          done(at, result, attrs);
          break;
        }
        case For::kOpendir: {
          Listing& l = listings[at];
          if (reply.type == kFxpHandle) {
            l.handle = f.str();
            if (!f.ok()) return protocol_error("truncated HANDLE");
            send_readdir(at);
          } else if (reply.type == kFxpStatus) {
            // Not listable (the files may still be statable): one by one.
            auto refused = status_error(f, l.dir);
            if (broken_) return refused;
            end_listing(at);
          } else {
            return protocol_error(fmt::format("OPENDIR answered by {}", reply.type));
          }
          break;
        }
        case For::kReaddir: {
          Listing& l = listings[at];
          if (reply.type == kFxpStatus) {
            // The end of the listing, or an error: the rest one by one.
            auto ended = status_error(f, l.dir);
            if (broken_) return ended;
            end_listing(at);
            break;
          }
          if (reply.type != kFxpName) {
            return protocol_error(fmt::format("READDIR answered by {}", reply.type));
          }
          const uint32_t count = f.u32();
          for (uint32_t e = 0; e < count && f.ok(); ++e) {
            std::string name = f.str();
            f.bytes();  // the ls -l style long name
            SourceStat attrs;
            uint32_t flags = 0;
            if (!parse_attrs(f, attrs, &flags)) break;
            auto w = l.wanted.find(name);
            if (w == l.wanted.end() || !answers_stat(flags, attrs)) continue;
            const size_t i = w->second;
            l.wanted.erase(w);
            answered[i] = true;
            done(i, {}, attrs);
          }
          if (!f.ok()) return protocol_error("truncated NAME");
          l.listed += count;
          if (l.wanted.empty() || l.listed >= l.limit) {
            end_listing(at);
          } else {
            send_readdir(at);
          }
          break;
        }
      }
    } while (reply_buffered());
  }
  return {};
}

Status Session::stat(const std::string& remote, SourceStat& out) {
  Outgoing req;
  const uint32_t id = queue(req, kFxpStat, remote);
  Reply reply;
  auto st = call(req, id, reply);
  if (!st.ok()) return st;
  Fields f(reply.body);
  if (reply.type == kFxpStatus) return status_error(f, remote);
  if (reply.type != kFxpAttrs)
    return protocol_error(fmt::format("STAT answered by {}", reply.type));
  out = SourceStat{};
  if (!parse_attrs(f, out)) return protocol_error("truncated ATTRS");
  return {};
}

void Session::queue_read(Outgoing& out, const std::string& handle, const PendingRead& p) {
  out.begin(kFxpRead);
  out.u32(p.id);
  out.str(handle);
  out.u64(p.offset + p.received);
  out.u32(p.length - p.received);
  out.end();
}

// Queues a request whose one field is a string (a path or a handle);
// returns its id.
uint32_t Session::queue(Outgoing& out, uint8_t type, std::string_view arg) {
  const uint32_t id = next_id_++;
  out.begin(type);
  out.u32(id);
  out.str(arg);
  out.end();
  return id;
}

// Nobody waits for a CLOSE's reply: a batch of files ends when its last
// byte is in, not a round trip later, and the reply is read on the way to
// a later one (receive()).
void Session::queue_close(Outgoing& out, const std::string& handle) {
  unanswered_closes_.insert(queue(out, kFxpClose, handle));
}

// A single read keeps its file open afterwards, so further reads of it cost
// no OPEN and CLOSE round trips; moving to another file sends the CLOSE of
// the old one together with the OPEN of the new.
Status Session::read(const std::string& remote, uint64_t offset, uint64_t length,
                     const ChunkSink& sink, const std::optional<SourceStat>& expect,
                     uint64_t& delivered) {
  Transfer t(remote, offset, length, sink);
  t.keep = true;
  t.expect = expect;
  std::vector<std::string> close_first;
  if (open_path_ == remote && !open_handle_.empty()) {
    t.handle = open_handle_;
    t.step = Transfer::Step::kReading;
  } else if (!open_handle_.empty()) {
    // OpenSSH's sftp-server keeps its free handles on a stack: the OPEN that
    // follows this CLOSE gets the handle just closed. So the FSTAT and READs
    // go out with the OPEN, with that handle, and a miss on another file
    // takes one round trip instead of two. A server that numbers handles
    // otherwise fails those requests (the handle is closed), and they are
    // sent again with the handle it gave (see run_transfers).
    if (predict_handles_.load(std::memory_order_relaxed)) t.predicted = open_handle_;
    close_first.push_back(std::exchange(open_handle_, {}));
    open_path_.clear();
  }
  Status result;
  auto st = run_transfers(std::span(&t, 1), close_first,
                          [&](size_t, const Status& status) { result = status; });
  delivered = t.delivered;
  return st.ok() ? result : st;
}

Status Session::read_many(std::span<Transfer> transfers, const Source::ReadDone& done) {
  // The file this session keeps open serves the first range of it directly.
  for (auto& t : transfers) {
    if (t.remote == open_path_ && !open_handle_.empty()) {
      t.handle = open_handle_;
      t.keep = true;
      t.step = Transfer::Step::kReading;
      break;
    }
  }
  return run_transfers(transfers, {}, done);
}

// Runs every transfer's OPEN, READs and CLOSE, pipelined: up to
// kFilesInFlight files open at once and kReadsInFlight READs outstanding over
// all of them, earlier transfers' READs first. Bytes go to each transfer's
// sink in order as soon as the ones before them are in; `done` runs for each
// transfer once its last byte was delivered or it failed. Every reply is
// drained even after a failure, so the session stays usable; only a broken
// stream returns early (with the transfers not yet done left to the caller).
Status Session::run_transfers(std::span<Transfer> ts, const std::vector<std::string>& close_first,
                              const Source::ReadDone& done) {
  std::unordered_map<uint32_t, size_t> owner;  // request id -> transfer index
  std::vector<size_t> active;                  // opening or reading, in order
  size_t next_open = 0;
  size_t reads_in_flight = 0;
  Outgoing out;
  Reply reply;
  for (const auto& h : close_first) queue_close(out, h);

  auto finish = [&](size_t i) {
    Transfer& t = ts[i];
    t.step = Transfer::Step::kDone;
    if (!t.handle.empty() && (!t.keep || !t.failure.ok())) {
      // A refused READ leaves the handle in doubt: it is not kept.
      if (t.keep && open_handle_ == t.handle) {
        open_handle_.clear();
        open_path_.clear();
      }
      queue_close(out, t.handle);
    }
    std::erase(active, i);
    done(i, t.failure);
  };

  while (true) {
    for (; next_open < ts.size() && active.size() < kFilesInFlight; ++next_open) {
      Transfer& t = ts[next_open];
      if (t.step == Transfer::Step::kWaiting) {
        t.open_id = next_id_++;
        out.begin(kFxpOpen);
        out.u32(t.open_id);
        out.str(t.remote);
        out.u32(kFxfRead);
        out.u32(0);  // no attributes
        out.end();
        owner[t.open_id] = next_open;
        t.step = Transfer::Step::kOpening;
        if (!t.predicted.empty()) {
          t.handle = t.predicted;
          if (sftp_hooks::mispredict_handles.load(std::memory_order_relaxed)) t.handle += '?';
          t.speculating = true;
          t.step = Transfer::Step::kReading;
        }
      }
      if (t.step != Transfer::Step::kDone) active.push_back(next_open);
    }
    for (size_t k = 0; k < active.size();) {
      const size_t i = active[k];
      Transfer& t = ts[i];
      if (t.step == Transfer::Step::kReading) {
        if (t.expect && !t.checked) {
          // Ahead of the READs (also on a handle kept open), so its answer
          // comes before their bytes.
          t.checked = true;
          t.fstat_id = queue(out, kFxpFstat, t.handle);
          owner[t.fstat_id] = i;
        }
        while (!t.eof && t.failure.ok() && t.next < t.end && reads_in_flight < kReadsInFlight) {
          PendingRead p;
          p.id = next_id_++;
          p.offset = t.next;
          p.length = static_cast<uint32_t>(std::min<uint64_t>(kReadRequest, t.end - t.next));
          queue_read(out, t.handle, p);
          owner[p.id] = i;
          t.next += p.length;
          t.reads.push_back(std::move(p));
          ++reads_in_flight;
        }
        const bool asked_all = t.eof || !t.failure.ok() || t.next >= t.end;
        if (asked_all && t.reads.empty() && t.fstat_id == 0 && !t.speculating) {
          finish(i);  // removes it from `active`
          continue;
        }
      }
      ++k;
    }
    if (!out.empty()) {
      auto st = send(out);
      out.clear();
      if (!st.ok()) return st;
    }
    if (owner.empty()) break;

    // Every reply already here is handled before the requests they lead to
    // go out together: one write to the channel for many replies, not one
    // each (each write wakes the ssh client, and on the far side sshd and
    // sftp-server, for a few dozen bytes).
    do {
      auto st = receive(reply);
      if (!st.ok()) return st;
      auto o = owner.find(reply.id);
      if (o == owner.end())
        return protocol_error(fmt::format("reply to unknown request {}", reply.id));
      const size_t i = o->second;
      owner.erase(o);
      Fields f(reply.body);
      Transfer& t = ts[i];
      if (t.step == Transfer::Step::kOpening || (t.speculating && reply.id == t.open_id)) {
        if (reply.type == kFxpStatus) {
          t.failure = status_error(f, t.remote);
          if (broken_) return t.failure;
          if (t.speculating) {
            reads_in_flight -= drop_speculation(t, owner);
            t.speculating = false;
            t.handle.clear();  // nothing to close
          }
          finish(i);
          continue;
        }
        if (reply.type != kFxpHandle) {
          return protocol_error(fmt::format("OPEN answered by {}", reply.type));
        }
        std::string handle = f.str();
        if (!f.ok() || handle.empty()) return protocol_error("bad HANDLE");
        if (t.speculating && handle == t.handle) {
          ++predicted_;
        } else if (t.speculating) {
          // Its requests went out with a handle that is not the file's: they
          // fail, and are asked again with this one. Not predicted again.
          if (predict_handles_.exchange(false)) {
            log::info(kLog,
                      "the server's handles are not as predicted; OPENs wait for theirs "
                      "endpoint={}",
                      s_.endpoint);
          }
          reads_in_flight -= drop_speculation(t, owner);
          t.next = t.begin;
          t.eof = false;
          t.checked = false;
        }
        t.speculating = false;
        t.handle = std::move(handle);
        t.step = Transfer::Step::kReading;
        if (t.keep) {
          open_path_ = t.remote;
          open_handle_ = t.handle;
        }
        continue;
      }
      if (t.speculating) {
        // An answer to a request sent with the predicted handle came before
        // the OPEN's: whose file it read is not known yet. This server answers
        // out of order; it gets no more predictions.
        predict_handles_.store(false, std::memory_order_relaxed);
        return protocol_error(fmt::format("reply to {} ahead of its OPEN's", reply.id));
      }
      if (t.fstat_id != 0 && reply.id == t.fstat_id) {
        t.fstat_id = 0;
        SourceStat now;
        // A server that cannot say leaves the read unchecked.
        if (reply.type == kFxpAttrs && parse_attrs(f, now) && t.failure.ok()) {
          if (auto why = changed_since(*t.expect, now); !why.empty()) {
            t.failure = Status::permanent(
                ESTALE,
                fmt::format("{} changed on the source since it was checked ({})", t.remote, why));
          }
        }
        continue;
      }
      st = on_read_reply(t, reply);
      if (!st.ok()) return st;
      // A short DATA asks again for the rest, under a new id.
      for (const auto& p : t.reads) {
        if (!p.done && !owner.contains(p.id)) {
          queue_read(out, t.handle, p);
          owner[p.id] = i;
        }
      }
      size_t before = t.reads.size();
      deliver_front(t);
      reads_in_flight -= before - t.reads.size();
    } while (reply_buffered());
  }
  return {};
}

// Forgets the FSTAT and READs sent with a transfer's predicted handle:
// their replies are read and dropped. Returns the READs forgotten.
size_t Session::drop_speculation(Transfer& t, std::unordered_map<uint32_t, size_t>& owner) {
  const size_t reads = t.reads.size();
  for (const auto& p : t.reads) {
    if (owner.erase(p.id) > 0) discarded_.insert(p.id);
  }
  t.reads.clear();
  if (t.fstat_id != 0) {
    owner.erase(t.fstat_id);
    discarded_.insert(t.fstat_id);
    t.fstat_id = 0;
  }
  return reads;
}

// Handles a READ's reply: DATA is handed on (or held until the bytes before
// it are in), EOF ends the asking, another STATUS is the transfer's failure.
Status Session::on_read_reply(Transfer& t, const Reply& reply) {
  auto it = std::find_if(t.reads.begin(), t.reads.end(),
                         [&](const PendingRead& p) { return p.id == reply.id && !p.done; });
  if (it == t.reads.end()) {
    return protocol_error(fmt::format("reply to unknown request {}", reply.id));
  }
  PendingRead& p = *it;
  Fields f(reply.body);
  if (reply.type == kFxpData) {
    auto data = f.bytes();
    if (!f.ok() || data.empty() || data.size() > p.length - p.received) {
      return protocol_error(
          fmt::format("DATA of {} bytes for a READ of {}", data.size(), p.length - p.received));
    }
    const bool usable = t.failure.ok() && !t.past_end;
    if (usable && it == t.reads.begin() && p.held.empty()) {
      (*t.sink)(p.offset + p.received, data);
      t.delivered += data.size();
    } else if (usable) {
      p.held.insert(p.held.end(), data.begin(), data.end());
    }
    p.received += static_cast<uint32_t>(data.size());
    if (p.received == p.length || !usable) {
      p.done = true;
    } else {
      p.id = next_id_++;  // re-sent by the caller for the rest
    }
    return {};
  }
  if (reply.type != kFxpStatus) {
    return protocol_error(fmt::format("READ answered by {}", reply.type));
  }
  p.done = true;
  if (f.u32() == kFxEof) {
    p.eof = true;
    t.eof = true;
  } else if (t.failure.ok()) {
    Fields again(reply.body);
    t.failure = status_error(again, t.remote);
    if (broken_) return t.failure;
  }
  return {};
}

// Hands on the bytes held at the front and drops finished READs.
void Session::deliver_front(Transfer& t) {
  while (!t.reads.empty()) {
    auto& front = t.reads.front();
    if (!front.held.empty() && t.failure.ok() && !t.past_end) {
      (*t.sink)(front.offset + front.received - front.held.size(), front.held);
      t.delivered += front.held.size();
      front.held.clear();
    }
    if (!front.done) break;
    if (front.eof || front.received < front.length) t.past_end = true;
    t.reads.pop_front();
  }
}

class SftpSource final : public Source {
 public:
  explicit SftpSource(SshSettings settings)
      : s_(with_cancellation(std::move(settings), &cancellation_)) {}

  std::string describe() const override { return s_.uri; }
  unsigned max_concurrency() const override { return s_.connections; }
  SourceState state() const override { return state_.load(std::memory_order_relaxed); }

  void cancel() override {
    cancellation_.cancel();
    std::lock_guard lock(mu_);
    cv_.notify_all();  // checkout() waiters
  }

  Status stat(const std::string& path, SourceStat& out) override {
    counters_.stats.fetch_add(1, std::memory_order_relaxed);
    auto remote = remote_path(path);
    return with_session([&](Session& session, bool&) { return session.stat(remote, out); });
  }

  void stat_many(const std::vector<std::string>& paths, const StatDone& done) override {
    counters_.stats.fetch_add(paths.size(), std::memory_order_relaxed);
    std::vector<std::string> remotes;
    remotes.reserve(paths.size());
    for (const auto& p : paths) remotes.push_back(remote_path(p));
    std::vector<bool> answered(paths.size(), false);
    auto st = with_session([&](Session& session, bool& progressed) {
      auto result = session.stat_many(remotes, answered, done);
      progressed = std::find(answered.begin(), answered.end(), true) != answered.end();
      return result;
    });
    if (st.ok()) return;
    for (size_t i = 0; i < paths.size(); ++i) {
      if (!answered[i]) done(i, st, SourceStat{});
    }
  }

  Status read(const std::string& path, uint64_t offset, uint64_t length,
              const ChunkSink& sink) override {
    return read_one(path, offset, length, sink, std::nullopt);
  }

  Status read_one(const std::string& path, uint64_t offset, uint64_t length, const ChunkSink& sink,
                  const std::optional<SourceStat>& expect) {
    counters_.reads.fetch_add(1, std::memory_order_relaxed);
    if (length == 0) return {};
    auto remote = remote_path(path);
    return with_session([&](Session& session, bool& progressed) {
      uint64_t delivered = 0;
      auto st = session.read(remote, offset, length, sink, expect, delivered);
      counters_.bytes_read.fetch_add(delivered, std::memory_order_relaxed);
      progressed = delivered > 0;
      log::debug(kLog, "read path={} off={} len={} got={} errno={}", remote, offset, length,
                 delivered, st.errnum());
      return st;
    });
  }

  // Many ranges on one session, pipelined (see Session::run_transfers).
  void read_many(std::span<const ReadRange> ranges, const ReadDone& done) override {
    if (ranges.size() == 1) {
      const auto& r = ranges[0];
      done(0, read_one(r.path, r.offset, r.length, r.sink, r.expect));
      return;
    }
    counters_.reads.fetch_add(ranges.size(), std::memory_order_relaxed);
    std::vector<bool> finished(ranges.size(), false);
    auto st = with_session([&](Session& session, bool& progressed) {
      std::vector<Transfer> transfers;
      std::vector<size_t> index;  // transfer -> range
      for (size_t i = 0; i < ranges.size(); ++i) {
        if (finished[i]) continue;
        transfers.emplace_back(remote_path(ranges[i].path), ranges[i].offset, ranges[i].length,
                               ranges[i].sink);
        transfers.back().expect = ranges[i].expect;
        index.push_back(i);
      }
      auto result = session.read_many(transfers, [&](size_t k, const Status& status) {
        finished[index[k]] = true;
        progressed = true;
        done(index[k], status);
      });
      uint64_t delivered = 0;
      for (const auto& t : transfers) delivered += t.delivered;
      counters_.bytes_read.fetch_add(delivered, std::memory_order_relaxed);
      progressed = progressed || delivered > 0;
      log::debug(kLog, "read_many ranges={} got={} errno={}", transfers.size(), delivered,
                 result.errnum());
      return result;
    });
    if (st.ok()) return;
    for (size_t i = 0; i < ranges.size(); ++i) {
      if (!finished[i]) done(i, st);
    }
  }

  ~SftpSource() override {
    for (auto& t : warmers_) t.join();
  }

  // Opens the pool's other sessions in parallel, so the first reads after a
  // mount do not each wait for an SSH handshake.
  void warm_up_async() override {
    unsigned want;
    {
      std::lock_guard lock(mu_);
      want = s_.connections - std::min(s_.connections, open_);
    }
    for (unsigned i = 0; i < want; ++i) {
      warmers_.emplace_back([this] {
        {
          std::lock_guard lock(mu_);
          if (open_ >= s_.connections) return;
          ++open_;
        }
        auto session = std::make_unique<Session>(s_, predict_handles_);
        if (session->connect(known_hosts_mu_).ok()) {
          counters_.connects.fetch_add(1, std::memory_order_relaxed);
          checkin(std::move(session));
        } else {
          counters_.connect_failures.fetch_add(1, std::memory_order_relaxed);
          session.reset();
          release_slot();
        }
      });
    }
  }

  // Opens the first session, so that make_sftp_source reports start-up errors.
  Status warm_up() {
    std::unique_ptr<Session> session;
    bool fresh = false;
    auto st = checkout(session, fresh);
    if (st.ok()) {
      checkin(std::move(session));
      started_.store(true, std::memory_order_relaxed);
    }
    return st;
  }

 private:
  std::string remote_path(const std::string& path) const {
    if (s_.root.empty()) return path;
    return path.empty() || path.front() != '/' ? s_.root + "/" + path : s_.root + path;
  }

  // Runs `op` on a pooled session. A session that sat idle may have died
  // with its server (restarted sshd, dropped NAT entry): if it fails at once
  // with a socket error, before anything was delivered, the call is tried
  // once more on a fresh session. A time-out is not retried: the call has
  // already used its time.
  template <typename Op>
  Status with_session(Op&& op) {
    for (int attempt = 0;; ++attempt) {
      std::unique_ptr<Session> session;
      bool fresh = false;
      auto st = checkout(session, fresh);
      if (!st.ok()) return st;
      bool progressed = false;
      try {
        st = op(*session, progressed);
      } catch (...) {
        // A sink that throws leaves replies unread: the session cannot be
        // reused, but its pool slot must come back.
        session->mark_broken();
        checkin(std::move(session));
        throw;
      }
      counters_.request_writes.fetch_add(session->take_writes(), std::memory_order_relaxed);
      counters_.predicted_opens.fetch_add(session->take_predicted(), std::memory_order_relaxed);
      const bool retry = !st.ok() && session->broken() && !session->timed_out() && !fresh &&
                         !progressed && attempt == 0;
      if (st.ok() || !session->broken()) {
        state_.store(SourceState::kConnected, std::memory_order_relaxed);
      } else if (!retry) {
        state_.store(SourceState::kRetrying, std::memory_order_relaxed);
      }
      if (session->broken()) log::info(kLog, "dropping session reason=\"{}\"", st.message());
      checkin(std::move(session));
      if (!retry) return st;
    }
  }

  static SshSettings with_cancellation(SshSettings s, detail::Cancellation* c) {
    s.cancellation = c;
    return s;
  }

  Status checkout(std::unique_ptr<Session>& out, bool& fresh) {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] {
        return cancellation_.cancelled() || !idle_.empty() || open_ < s_.connections;
      });
      if (cancellation_.cancelled()) return shutting_down();
      if (!idle_.empty()) {
        out = std::move(idle_.back());
        idle_.pop_back();
        fresh = false;
        return {};
      }
      ++open_;
    }
    auto session = std::make_unique<Session>(s_, predict_handles_);
    auto st = session->connect(known_hosts_mu_);
    if (!st.ok()) {
      counters_.connect_failures.fetch_add(1, std::memory_order_relaxed);
      state_.store(SourceState::kDown, std::memory_order_relaxed);
      // At start the caller reports it (make_sftp_source's status).
      if (started_.load(std::memory_order_relaxed)) {
        log::warn(kLog, "connect failed reason=\"{}\"", st.message());
      }
      session.reset();
      release_slot();
      return st;
    }
    auto n = counters_.connects.fetch_add(1, std::memory_order_relaxed) + 1;
    log::info(kLog, "connected uri={} connects={}", s_.uri, n);
    fresh = true;
    out = std::move(session);
    return {};
  }

  void checkin(std::unique_ptr<Session> session) {
    if (session->broken()) {
      session.reset();  // outside the lock: tearing down may touch the socket
      release_slot();
      return;
    }
    std::lock_guard lock(mu_);
    idle_.push_back(std::move(session));
    cv_.notify_one();
  }

  void release_slot() {
    std::lock_guard lock(mu_);
    --open_;
    cv_.notify_one();
  }

  detail::Cancellation cancellation_;  // before s_, which points to it
  const SshSettings s_;
  std::mutex known_hosts_mu_;                // serialises reading and appending known_hosts
  std::atomic<bool> predict_handles_{true};  // see Session::read; before idle_
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Session>> idle_;  // guarded by mu_
  unsigned open_ = 0;  // sessions idle, in use or being opened; guarded by mu_
  std::atomic<SourceState> state_{SourceState::kConnected};
  std::atomic<bool> started_{false};  // warm_up succeeded
  std::vector<std::thread> warmers_;  // joined on destruction
};

// Also refuses a leading '-': an ssh client would read it as an option.
bool valid_host(std::string_view host) {
  if (host.empty() || host.front() == '-') return false;
  return std::none_of(host.begin(), host.end(), [](char c) {
    return static_cast<unsigned char>(c) <= ' ' || c == '/' || c == '@' || c == '[' || c == ']' ||
           c == '?' || c == '#' || c == 0x7f;
  });
}

}  // namespace

bool parse_sftp_uri(const std::string& uri, SftpOptions& options, std::string& error) {
  std::string_view rest = uri;
  std::string_view root;
  const bool is_uri = rest.substr(0, 7) == "sftp://";
  if (is_uri) {
    rest.remove_prefix(7);
    auto slash = rest.find('/');
    if (slash != std::string_view::npos) {
      root = rest.substr(slash);
      rest = rest.substr(0, slash);
    }
  } else if (auto scheme = rest.find("://"); scheme != std::string_view::npos) {
    error = fmt::format("{}: unsupported scheme \"{}\" (expected sftp://[USER@]HOST[:PORT][/ROOT])",
                        uri, rest.substr(0, scheme));
    return false;
  }

  std::string_view user;
  if (auto at = rest.rfind('@'); at != std::string_view::npos) {
    user = rest.substr(0, at);
    rest = rest.substr(at + 1);
    if (user.empty()) {
      error = fmt::format("{}: empty user name before '@'", uri);
      return false;
    }
    if (user.find(':') != std::string_view::npos) {
      error = fmt::format("{}: passwords in the URI are not supported (use keys)", uri);
      return false;
    }
    if (!valid_host(user)) {
      error = fmt::format("{}: bad user name \"{}\"", uri, user);
      return false;
    }
  }

  std::string_view host = rest;
  std::string_view port;
  if (!rest.empty() && rest.front() == '[') {
    auto close = rest.find(']');
    if (close == std::string_view::npos) {
      error = fmt::format("{}: unterminated '[' in the host", uri);
      return false;
    }
    host = rest.substr(1, close - 1);
    auto after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':' || !is_uri) {
        error = fmt::format("{}: unexpected \"{}\" after the host", uri, after);
        return false;
      }
      port = after.substr(1);
      if (port.empty()) {
        error = fmt::format("{}: empty port", uri);
        return false;
      }
    }
  } else if (auto colon = rest.find(':'); colon != std::string_view::npos) {
    if (!is_uri) {
      error = fmt::format(
          "{}: expected [USER@]HOST or sftp://[USER@]HOST[:PORT][/ROOT] (HOST:PATH is not "
          "supported)",
          uri);
      return false;
    }
    if (rest.find(':', colon + 1) != std::string_view::npos) {
      error = fmt::format("{}: an IPv6 address must be written in brackets, as [::1]", uri);
      return false;
    }
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
    if (port.empty()) {
      error = fmt::format("{}: empty port", uri);
      return false;
    }
  }
  if (host.empty()) {
    error = fmt::format("{}: empty host", uri);
    return false;
  }
  if (!valid_host(host)) {
    error = fmt::format("{}: bad host \"{}\"", uri, host);
    return false;
  }
  uint16_t port_value = 0;
  if (!port.empty()) {
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535) {
      error = fmt::format("{}: bad port \"{}\" (expected 1-65535)", uri, port);
      return false;
    }
    port_value = static_cast<uint16_t>(value);
  }
  if (!root.empty() && root.find("//") != std::string_view::npos) {
    error = fmt::format("{}: the remote root has an empty path component", uri);
    return false;
  }

  if (!user.empty()) options.user = user;
  options.host = host;
  if (port_value) options.port = port_value;
  if (!root.empty()) options.root = root;
  return true;
}

std::unique_ptr<Source> make_sftp_source(const SftpOptions& options, Status& status) {
  SshSettings s;
  s.client = options.client;
  s.ssh_command = options.ssh_command;
  s.ssh_options = options.ssh_options;
  s.host = options.host;
  s.port = options.port;
  s.connections = options.connections;
  s.policy = options.host_key_policy;
  s.connect_timeout = options.connect_timeout;
  s.stall_timeout = options.stall_timeout;
  if (s.host.empty()) {
    status = Status::permanent(EINVAL, "no SFTP host given");
    return nullptr;
  }
  if (!valid_host(s.host) || (!options.user.empty() && !valid_host(options.user))) {
    status = Status::permanent(
        EINVAL, fmt::format("bad SFTP user or host \"{}@{}\"", options.user, s.host));
    return nullptr;
  }
  if (s.port == 0) {
    status = Status::permanent(EINVAL, fmt::format("bad SFTP port 0 for {}", s.host));
    return nullptr;
  }
  if (s.connections == 0) {
    status = Status::permanent(EINVAL, "an SFTP source needs at least one connection");
    return nullptr;
  }
  if (options.root.empty() || options.root.front() != '/') {
    status = Status::permanent(
        EINVAL, fmt::format("the remote root \"{}\" is not an absolute path", options.root));
    return nullptr;
  }
  s.root = options.root;
  while (!s.root.empty() && s.root.back() == '/') s.root.pop_back();

  const Passwd pw = current_passwd();
  s.user = options.user;
  if (s.user.empty()) {
    const char* env = ::getenv("USER");
    s.user = env && *env ? env : pw.name;
  }
  if (s.user.empty()) {
    status = Status::permanent(EINVAL, "cannot tell the SFTP user name: give USER@HOST");
    return nullptr;
  }
  std::string home;
  if (const char* env = ::getenv("HOME"); env && *env) {
    home = env;
  } else {
    home = pw.home;
  }
  s.known_hosts = options.known_hosts;
  if (s.known_hosts.empty()) s.known_hosts = home + "/.ssh/known_hosts";
  s.identity_files = options.identity_files;
  if (s.identity_files.empty() && !home.empty()) {
    for (const char* name : {"id_ed25519", "id_ecdsa", "id_rsa"}) {
      auto file = home + "/.ssh/" + name;
      std::error_code ec;
      if (std::filesystem::exists(file, ec)) s.identity_files.push_back(file);
    }
  }
  s.endpoint = fmt::format("{}:{}", host_for_uri(s.host), s.port);
  s.login = fmt::format("sftp://{}@{}", s.user, s.endpoint);
  s.uri = s.login + (s.root.empty() ? "/" : s.root);

  auto source = std::make_unique<SftpSource>(std::move(s));
  status = source->warm_up();
  if (!status.ok()) return nullptr;
  return source;
}

}  // namespace lazyfs
