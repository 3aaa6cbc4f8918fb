// The libssh2 client: an SSH session inside this process, on a TCP socket
// of its own, with libssh2's host key store and authentication.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/core.h>
#include <libssh2.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <string_view>

#include "lazyfs/fileio.h"
#include "lazyfs/log.h"
#include "ssh_channel.h"

namespace lazyfs::detail {
namespace {

constexpr std::string_view kLog = "sftp";

// The SSH channel's receive window. Larger than all reads in flight, so the
// server never waits for a window adjustment.
constexpr unsigned kChannelWindow = 16 * 1024 * 1024;

void init_libssh2_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (libssh2_init(0) != 0) {
      log::error(kLog, "libssh2_init failed");
      std::abort();
    }
  });
}

// OpenSSH's fingerprint format: "SHA256:" and unpadded base64.
std::string sha256_fingerprint(LIBSSH2_SESSION* session) {
  const char* hash = libssh2_hostkey_hash(session, LIBSSH2_HOSTKEY_HASH_SHA256);
  if (!hash) return "unknown";
  std::array<unsigned char, 64> out{};
  int n = EVP_EncodeBlock(out.data(), reinterpret_cast<const unsigned char*>(hash), 32);
  std::string b64(reinterpret_cast<const char*>(out.data()), static_cast<size_t>(std::max(n, 0)));
  while (!b64.empty() && b64.back() == '=') b64.pop_back();
  return "SHA256:" + b64;
}

// Host key types, in the order we prefer them, with the hostkey method names
// that produce each.
struct KeyType {
  int knownhost_type;
  int session_type;
  const char* methods;
};
constexpr std::array<KeyType, 6> kKeyTypes{{
    {LIBSSH2_KNOWNHOST_KEY_ED25519, LIBSSH2_HOSTKEY_TYPE_ED25519, "ssh-ed25519"},
    {LIBSSH2_KNOWNHOST_KEY_ECDSA_256, LIBSSH2_HOSTKEY_TYPE_ECDSA_256, "ecdsa-sha2-nistp256"},
    {LIBSSH2_KNOWNHOST_KEY_ECDSA_384, LIBSSH2_HOSTKEY_TYPE_ECDSA_384, "ecdsa-sha2-nistp384"},
    {LIBSSH2_KNOWNHOST_KEY_ECDSA_521, LIBSSH2_HOSTKEY_TYPE_ECDSA_521, "ecdsa-sha2-nistp521"},
    {LIBSSH2_KNOWNHOST_KEY_SSHRSA, LIBSSH2_HOSTKEY_TYPE_RSA, "rsa-sha2-512,rsa-sha2-256,ssh-rsa"},
    {LIBSSH2_KNOWNHOST_KEY_SSHDSS, LIBSSH2_HOSTKEY_TYPE_DSS, "ssh-dss"},
}};

// A known_hosts file loaded into libssh2. Lines libssh2 cannot parse
// (markers, key types it does not know) are skipped, not fatal, and the file
// is never rewritten, only appended to, so that they survive.
class KnownHosts {
 public:
  explicit KnownHosts(LIBSSH2_SESSION* session) : hosts_(libssh2_knownhost_init(session)) {}
  ~KnownHosts() {
    if (hosts_) libssh2_knownhost_free(hosts_);
  }
  KnownHosts(const KnownHosts&) = delete;
  KnownHosts& operator=(const KnownHosts&) = delete;

  bool valid() const { return hosts_ != nullptr; }
  LIBSSH2_KNOWNHOSTS* get() const { return hosts_; }

  void load(const std::string& file) {
    std::ifstream in(file);
    std::string line;
    size_t skipped = 0;
    while (std::getline(in, line)) {
      auto first = line.find_first_not_of(" \t");
      if (first == std::string::npos || line[first] == '#') continue;
      if (libssh2_knownhost_readline(hosts_, line.data(), line.size(),
                                     LIBSSH2_KNOWNHOST_FILE_OPENSSH) != 0) {
        ++skipped;
      }
    }
    if (skipped) log::debug(kLog, "known_hosts file={} skipped_lines={}", file, skipped);
  }

  // Whether known_hosts holds a key of `type` for host:port. A probe with a
  // key that matches nothing reports MISMATCH exactly when such an entry
  // exists (libssh2 compares keys of the same type only); this also finds
  // hashed entries.
  bool has_key_type(const std::string& host, int port, int type) const {
    return libssh2_knownhost_checkp(
               hosts_, host.c_str(), port, "AAAA", 0,
               LIBSSH2_KNOWNHOST_TYPE_PLAIN | LIBSSH2_KNOWNHOST_KEYENC_BASE64 | type,
               nullptr) == LIBSSH2_KNOWNHOST_CHECK_MISMATCH;
  }

 private:
  LIBSSH2_KNOWNHOSTS* hosts_;
};

// Maps a libssh2 error on a session to a transient Status.
Status session_error(LIBSSH2_SESSION* session, int rc, const std::string& what,
                     const std::string& login, std::chrono::milliseconds timeout) {
  char* msg = nullptr;
  int last = libssh2_session_last_error(session, &msg, nullptr, 0);
  if (rc >= 0) rc = last;
  std::string text = msg && *msg ? msg : fmt::format("libssh2 error {}", rc);
  int errnum = EIO;
  switch (rc) {
    case LIBSSH2_ERROR_TIMEOUT:
    case LIBSSH2_ERROR_SOCKET_TIMEOUT:
      errnum = ETIMEDOUT;
      text = fmt::format("no progress for {} ms", timeout.count());
      break;
    case LIBSSH2_ERROR_SOCKET_SEND:
    case LIBSSH2_ERROR_SOCKET_RECV:
    case LIBSSH2_ERROR_SOCKET_DISCONNECT:
    case LIBSSH2_ERROR_SOCKET_NONE:
    case LIBSSH2_ERROR_CHANNEL_CLOSED:
    case LIBSSH2_ERROR_CHANNEL_EOF_SENT:
    case LIBSSH2_ERROR_CHANNEL_FAILURE:
      errnum = ECONNRESET;
      break;
    default:
      break;
  }
  return Status::transient(errnum, fmt::format("{} on {}: {}", what, login, text));
}

Status tcp_connect(const SshSettings& s, UniqueFd& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  auto port = std::to_string(s.port);
  int rc = ::getaddrinfo(s.host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    return Status::transient(EHOSTUNREACH,
                             fmt::format("cannot connect to {}: {}", s.login, ::gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> addrs(found, &::freeaddrinfo);
  const auto deadline = std::chrono::steady_clock::now() + s.connect_timeout;
  int last_error = EHOSTUNREACH;
  for (auto* ai = addrs.get(); ai; ai = ai->ai_next) {
    UniqueFd fd(
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (!fd) {
      last_error = errno;
      continue;
    }
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last_error = errno;
        continue;
      }
      pollfd pfds[2] = {{fd.get(), POLLOUT, 0},
                        {s.cancellation ? s.cancellation->fd() : -1, POLLIN, 0}};
      int ready = 0;
      do {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        ready = ::poll(pfds, 2, static_cast<int>(std::max<int64_t>(left.count(), 0)));
      } while (ready < 0 && errno == EINTR);
      if (pfds[1].revents) return shutting_down();
      if (ready <= 0) {
        last_error = ready == 0 ? ETIMEDOUT : errno;
        continue;
      }
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) {
        last_error = err;
        continue;
      }
    }
    // libssh2 runs the socket in blocking mode and times out by itself.
    int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
      last_error = errno;
      continue;
    }
    // Pipelined READs are small writes that must not wait for Nagle.
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    out = std::move(fd);
    return {};
  }
  return Status::transient(
      last_error, fmt::format("cannot connect to {}: {}", s.login, errno_text(last_error)));
}

class Libssh2Channel final : public SshChannel {
 public:
  explicit Libssh2Channel(const SshSettings& settings) : s_(settings) {}
  ~Libssh2Channel() override;
  Libssh2Channel(const Libssh2Channel&) = delete;
  Libssh2Channel& operator=(const Libssh2Channel&) = delete;

  Status connect(std::mutex& known_hosts_mu);
  Status write(std::span<const std::byte> data) override;
  Status read(std::span<std::byte> buf, size_t& got) override;
  void abandon() override { broken_ = true; }

 private:
  void prefer_known_key_types(const KnownHosts& known);
  Status check_host_key(KnownHosts& known, std::mutex& known_hosts_mu);
  Status authenticate();
  Status start_sftp();
  Status fail(int rc, const std::string& what);

  const SshSettings& s_;
  UniqueFd fd_;
  LIBSSH2_SESSION* session_ = nullptr;
  LIBSSH2_CHANNEL* channel_ = nullptr;
  bool broken_ = false;
  bool started_ = false;                 // a first byte came back: stall time-outs from now
  std::chrono::milliseconds timeout_{};  // the one set on session_ now
  bool host_known_ = false;              // known_hosts has some key for the host
};

Libssh2Channel::~Libssh2Channel() {
  if (fd_ && s_.cancellation) s_.cancellation->remove_socket(fd_.get());
  if (broken_ && fd_) {
    // Make every further socket call fail at once, so that tearing down a
    // dead or stalled session cannot wait for the peer.
    ::shutdown(fd_.get(), SHUT_RDWR);
  }
  if (channel_) libssh2_channel_free(channel_);
  if (session_) {
    if (!broken_) libssh2_session_disconnect(session_, "lazyfs closing");
    libssh2_session_free(session_);
  }
}

Status Libssh2Channel::fail(int rc, const std::string& what) {
  broken_ = true;
  if (s_.cancellation && s_.cancellation->cancelled()) return shutting_down();
  return session_error(session_, rc, what, s_.login, timeout_);
}

Status Libssh2Channel::connect(std::mutex& known_hosts_mu) {
  auto st = tcp_connect(s_, fd_);
  if (!st.ok()) return st;
  // libssh2 blocks inside its calls: a cancel shuts the socket down.
  if (s_.cancellation) s_.cancellation->add_socket(fd_.get());
  session_ = libssh2_session_init();
  if (!session_) return Status::transient(ENOMEM, "cannot create an SSH session");
  libssh2_session_set_blocking(session_, 1);
  timeout_ = s_.connect_timeout;
  libssh2_session_set_timeout(session_, static_cast<long>(timeout_.count()));

  KnownHosts known(session_);
  if (s_.policy != HostKeyPolicy::kInsecure) {
    if (!known.valid()) return Status::transient(ENOMEM, "cannot create a known_hosts collection");
    {
      std::lock_guard lock(known_hosts_mu);
      known.load(s_.known_hosts);
    }
    prefer_known_key_types(known);
  }

  int rc = libssh2_session_handshake(session_, fd_.get());
  if (rc != 0) return fail(rc, "SSH handshake");
  st = check_host_key(known, known_hosts_mu);
  if (!st.ok()) return st;
  st = authenticate();
  if (!st.ok()) return st;
  // The connect time-out holds until the server's first bytes: the SFTP
  // VERSION, read by the caller.
  return start_sftp();
}

// libssh2 1.10 asks for ECDSA host keys first. If known_hosts holds another
// type for this host (OpenSSH records ed25519 first), ask for the known types
// first, or the check would look up a key type that is not there. The other
// types follow, so a server without the known type still completes the
// handshake and gets a clear refusal.
void Libssh2Channel::prefer_known_key_types(const KnownHosts& known) {
  // libssh2 1.10 strips methods it does not support from a preference list
  // with an overlapping memcpy (AddressSanitizer catches it): offer only
  // supported ones.
  std::set<std::string, std::less<>> supported;
  const char** algs = nullptr;
  int count = libssh2_session_supported_algs(session_, LIBSSH2_METHOD_HOSTKEY, &algs);
  for (int i = 0; i < count; ++i) supported.insert(algs[i]);
  if (algs) libssh2_free(session_, algs);

  std::string known_methods, other_methods;
  for (const auto& t : kKeyTypes) {
    const bool is_known = known.has_key_type(s_.host, s_.port, t.knownhost_type);
    host_known_ = host_known_ || is_known;
    auto& list = is_known ? known_methods : other_methods;
    std::string_view names = t.methods;
    while (!names.empty()) {
      auto comma = names.find(',');
      auto name = names.substr(0, comma);
      names = comma == std::string_view::npos ? std::string_view() : names.substr(comma + 1);
      if (!supported.count(name)) continue;
      if (!list.empty()) list += ',';
      list += name;
    }
  }
  if (!host_known_ || known_methods.empty()) return;
  auto methods = other_methods.empty() ? known_methods : known_methods + "," + other_methods;
  if (libssh2_session_method_pref(session_, LIBSSH2_METHOD_HOSTKEY, methods.c_str()) != 0) {
    log::warn(kLog, "host key preference not accepted endpoint={} methods={}", s_.endpoint,
              methods);
  }
}

Status Libssh2Channel::check_host_key(KnownHosts& known, std::mutex& known_hosts_mu) {
  size_t len = 0;
  int type = 0;
  const char* key = libssh2_session_hostkey(session_, &len, &type);
  if (!key) return fail(0, "reading the host key");
  auto fingerprint = sha256_fingerprint(session_);
  if (s_.policy == HostKeyPolicy::kInsecure) {
    log::warn(kLog, "host key NOT checked (insecure policy) endpoint={} fingerprint={}",
              s_.endpoint, fingerprint);
    return {};
  }
  int key_type = LIBSSH2_KNOWNHOST_KEY_UNKNOWN;
  for (const auto& t : kKeyTypes) {
    if (t.session_type == type) key_type = t.knownhost_type;
  }
  const int typemask = LIBSSH2_KNOWNHOST_TYPE_PLAIN | LIBSSH2_KNOWNHOST_KEYENC_RAW | key_type;
  auto check = [&](KnownHosts& hosts) {
    return libssh2_knownhost_checkp(hosts.get(), s_.host.c_str(), s_.port, key, len, typemask,
                                    nullptr);
  };
  int rc = check(known);
  if (rc == LIBSSH2_KNOWNHOST_CHECK_MATCH) return {};
  if (rc == LIBSSH2_KNOWNHOST_CHECK_MISMATCH) {
    return Status::permanent(
        EACCES, fmt::format("host key for {} does not match the one in {}: refusing to connect "
                            "(possible man-in-the-middle; offered {})",
                            s_.endpoint, s_.known_hosts, fingerprint));
  }
  if (rc != LIBSSH2_KNOWNHOST_CHECK_NOTFOUND) {
    return Status::permanent(EIO, fmt::format("cannot check the host key for {} against {}",
                                              s_.endpoint, s_.known_hosts));
  }
  if (host_known_) {
    // Known under another key type only: the server no longer offers the
    // key we know. Accepting the new one would defeat accept-new's promise.
    return Status::permanent(
        EACCES, fmt::format("host key for {} is not in {}, which holds other key types for it: "
                            "refusing to connect (possible man-in-the-middle; offered {})",
                            s_.endpoint, s_.known_hosts, fingerprint));
  }
  if (s_.policy != HostKeyPolicy::kAcceptNew) {
    return Status::permanent(
        EACCES, fmt::format("host key for {} is not in {} (use --accept-new-host-key to add it; "
                            "offered {})",
                            s_.endpoint, s_.known_hosts, fingerprint));
  }

  // Re-read under the lock: another session may have added it meanwhile.
  std::lock_guard lock(known_hosts_mu);
  KnownHosts fresh(session_);
  if (!fresh.valid()) return Status::transient(ENOMEM, "cannot create a known_hosts collection");
  fresh.load(s_.known_hosts);
  rc = check(fresh);
  if (rc == LIBSSH2_KNOWNHOST_CHECK_MATCH) return {};
  if (rc == LIBSSH2_KNOWNHOST_CHECK_MISMATCH) {
    return Status::permanent(
        EACCES, fmt::format("host key for {} does not match the one in {}: refusing to connect "
                            "(possible man-in-the-middle)",
                            s_.endpoint, s_.known_hosts));
  }
  // OpenSSH's form: the bare host on port 22, "[host]:port" otherwise.
  auto name = s_.port == 22 ? s_.host : fmt::format("[{}]:{}", s_.host, s_.port);
  libssh2_knownhost* entry = nullptr;
  if (libssh2_knownhost_addc(fresh.get(), name.c_str(), nullptr, key, len, nullptr, 0, typemask,
                             &entry) != 0) {
    return Status::permanent(EIO, fmt::format("cannot add the host key for {}", s_.endpoint));
  }
  std::array<char, 8192> line{};
  size_t line_len = 0;
  if (libssh2_knownhost_writeline(fresh.get(), entry, line.data(), line.size(), &line_len,
                                  LIBSSH2_KNOWNHOST_FILE_OPENSSH) != 0) {
    return Status::permanent(EIO, fmt::format("cannot format the host key for {}", s_.endpoint));
  }
  std::error_code ec;
  auto dir = std::filesystem::path(s_.known_hosts).parent_path();
  if (!dir.empty() && !std::filesystem::exists(dir, ec)) {
    std::filesystem::create_directories(dir, ec);
    std::filesystem::permissions(dir, std::filesystem::perms::owner_all, ec);
  }
  // Appended, never rewritten, so lines libssh2 does not understand stay.
  UniqueFd out(::open(s_.known_hosts.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644));
  if (!out) {
    return Status::permanent(errno, fmt::format("cannot add the host key for {} to {}: {}",
                                                s_.endpoint, s_.known_hosts, errno_text(errno)));
  }
  std::string_view text(line.data(), line_len);
  while (!text.empty()) {
    ssize_t n = ::write(out.get(), text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return Status::permanent(
          errno, fmt::format("cannot write {}: {}", s_.known_hosts, errno_text(errno)));
    }
    text.remove_prefix(static_cast<size_t>(n));
  }
  log::info(kLog, "added host key endpoint={} fingerprint={} file={}", s_.endpoint, fingerprint,
            s_.known_hosts);
  return {};
}

Status Libssh2Channel::authenticate() {
  std::vector<std::string> tried;
  if (::getenv("SSH_AUTH_SOCK")) {
    tried.push_back("ssh-agent");
    LIBSSH2_AGENT* agent = libssh2_agent_init(session_);
    if (agent) {
      if (libssh2_agent_connect(agent) == 0 && libssh2_agent_list_identities(agent) == 0) {
        libssh2_agent_publickey* identity = nullptr;
        libssh2_agent_publickey* prev = nullptr;
        while (libssh2_agent_get_identity(agent, &identity, prev) == 0) {
          if (libssh2_agent_userauth(agent, s_.user.c_str(), identity) == 0) break;
          prev = identity;
        }
        libssh2_agent_disconnect(agent);
      }
      libssh2_agent_free(agent);
    }
    if (libssh2_userauth_authenticated(session_)) return {};
  }
  for (const auto& key : s_.identity_files) {
    tried.push_back(key);
    auto pub = key + ".pub";
    std::error_code ec;
    bool have_pub = std::filesystem::exists(pub, ec);
    int rc = libssh2_userauth_publickey_fromfile_ex(
        session_, s_.user.c_str(), static_cast<unsigned>(s_.user.size()),
        have_pub ? pub.c_str() : nullptr, key.c_str(), nullptr);
    if (rc == 0) return {};
    switch (rc) {
      case LIBSSH2_ERROR_TIMEOUT:
      case LIBSSH2_ERROR_SOCKET_SEND:
      case LIBSSH2_ERROR_SOCKET_RECV:
      case LIBSSH2_ERROR_SOCKET_DISCONNECT:
      case LIBSSH2_ERROR_SOCKET_TIMEOUT:
        return fail(rc, "authentication");
      default:
        log::debug(kLog, "key not accepted endpoint={} key={} rc={}", s_.endpoint, key, rc);
    }
  }
  std::string list;
  for (const auto& t : tried) list += (list.empty() ? "" : ", ") + t;
  return Status::permanent(
      EACCES, fmt::format("authentication failed for {}@{} (tried: {})", s_.user, s_.endpoint,
                          list.empty() ? "no agent, no identity file" : list));
}

Status Libssh2Channel::start_sftp() {
  channel_ = libssh2_channel_open_ex(session_, "session", sizeof("session") - 1, kChannelWindow,
                                     LIBSSH2_CHANNEL_PACKET_DEFAULT, nullptr, 0);
  if (!channel_) return fail(0, "opening an SSH channel");
  // The server's stderr is of no use to us and must not fill the window.
  libssh2_channel_handle_extended_data2(channel_, LIBSSH2_CHANNEL_EXTENDED_DATA_IGNORE);
  int rc = libssh2_channel_process_startup(channel_, "subsystem", sizeof("subsystem") - 1, "sftp",
                                           sizeof("sftp") - 1);
  if (rc != 0) return fail(rc, "starting the sftp subsystem");
  return {};
}

Status Libssh2Channel::write(std::span<const std::byte> data) {
  while (!data.empty()) {
    ssize_t n =
        libssh2_channel_write(channel_, reinterpret_cast<const char*>(data.data()), data.size());
    if (n < 0) return fail(static_cast<int>(n), "sending");
    data = data.subspan(static_cast<size_t>(n));
  }
  return {};
}

Status Libssh2Channel::read(std::span<std::byte> buf, size_t& got) {
  ssize_t n = libssh2_channel_read(channel_, reinterpret_cast<char*>(buf.data()), buf.size());
  if (n < 0) return fail(static_cast<int>(n), "receiving");
  if (n == 0) {
    if (s_.cancellation && s_.cancellation->cancelled()) {
      broken_ = true;
      return shutting_down();
    }
    int last = libssh2_session_last_errno(session_);
    if (last == LIBSSH2_ERROR_TIMEOUT) return fail(last, "receiving");
    broken_ = true;
    return Status::transient(ECONNRESET,
                             fmt::format("receiving on {}: connection closed", s_.login));
  }
  got = static_cast<size_t>(n);
  if (!started_) {
    started_ = true;
    timeout_ = s_.stall_timeout;
    libssh2_session_set_timeout(session_, static_cast<long>(timeout_.count()));
  }
  return {};
}

}  // namespace

Status open_libssh2_channel(const SshSettings& s, std::mutex& known_hosts_mu,
                            std::unique_ptr<SshChannel>& out) {
  init_libssh2_once();
  auto channel = std::make_unique<Libssh2Channel>(s);
  auto st = channel->connect(known_hosts_mu);
  if (st.ok()) out = std::move(channel);
  return st;
}

}  // namespace lazyfs::detail
