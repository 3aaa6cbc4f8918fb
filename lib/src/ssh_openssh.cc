// The OpenSSH client: one `ssh -s HOST sftp` child process per session, as
// sshfs does. Its stdin and stdout are one end of a socketpair (the other is
// the channel), its stderr a pipe we read for error messages.
//
// Why a child process: libssh2 1.10 (Debian 12) has neither AES-GCM nor
// ChaCha20-Poly1305 and decrypts in 16-byte calls; it cost the daemon about
// 4 CPU seconds per GiB, where ssh with AES-GCM costs about 0.6, which
// decides how fast a fill completes on a busy host. ssh also brings what users
// have configured in ~/.ssh/config (ProxyJump, aliases, keys).
//
// The child never prompts (BatchMode), uses no connection multiplexing (each
// session must be its own connection) and asks for AES-GCM first (fast with
// AES-NI; the rest of OpenSSH's default list follows). Host key checking maps
// onto StrictHostKeyChecking; ssh's own messages are turned into the same
// Status wording the libssh2 client uses.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <string_view>
#include <thread>

#include "lazyfs/fileio.h"
#include "lazyfs/log.h"
#include "ssh_channel.h"

extern char** environ;

namespace lazyfs::detail {
namespace {

constexpr std::string_view kLog = "sftp";
// ssh's stderr kept for error messages: its last lines, at most this much.
constexpr size_t kStderrKept = 4096;

// ssh_config values are split at spaces, may be quoted, and expand "%x"
// tokens (IdentityFile, UserKnownHostsFile): quote and escape a path.
std::string config_path(const std::string& path) {
  std::string out = "\"";
  for (char c : path) {
    if (c == '%') out += '%';
    out += c;
  }
  return out + "\"";
}

std::string_view last_line(std::string_view text) {
  while (!text.empty() && text.back() == '\n') text.remove_suffix(1);
  if (auto nl = text.rfind('\n'); nl != std::string_view::npos) text.remove_prefix(nl + 1);
  return text;
}

class OpenSshChannel final : public SshChannel {
 public:
  explicit OpenSshChannel(const SshSettings& settings) : s_(settings) {}
  ~OpenSshChannel() override;
  OpenSshChannel(const OpenSshChannel&) = delete;
  OpenSshChannel& operator=(const OpenSshChannel&) = delete;

  Status start();
  Status write(std::span<const std::byte> data) override;
  Status read(std::span<std::byte> buf, size_t& got) override;
  void abandon() override {}  // tearing down never waits for the peer anyway

 private:
  std::vector<std::string> arguments() const;
  // Waits until `io_` is ready for `events`, reading ssh's stderr meanwhile.
  Status wait_for(short events);
  void read_stderr();
  // ssh closed the channel or could not be written to: reaps it and says why.
  Status ended();
  Status connect_error(int exit_status) const;
  void stop_child();

  const SshSettings& s_;
  pid_t pid_ = -1;
  UniqueFd io_;   // our end of the socketpair: ssh's stdin and stdout
  UniqueFd err_;  // ssh's stderr
  std::string stderr_;
  std::string partial_line_;
  bool started_ = false;  // a first byte came back: stall time-outs from now
  std::chrono::steady_clock::time_point connect_deadline_;
};

std::vector<std::string> OpenSshChannel::arguments() const {
  const auto seconds =
      std::max<int64_t>(1, std::chrono::ceil<std::chrono::seconds>(s_.connect_timeout).count());
  // No X11, agent or port forwarding, no terminal.
  std::vector<std::string> args = {s_.ssh_command, "-x", "-a", "-T"};
  const auto option = [&](std::string o) {
    args.emplace_back("-o");
    args.push_back(std::move(o));
  };
  // The user's first: ssh keeps the first value it sees for an option.
  for (const auto& o : s_.ssh_options) option(o);
  option("BatchMode=yes");
  option("ClearAllForwardings=yes");
  option("ControlMaster=no");
  option("ControlPath=none");
  option(fmt::format("ConnectTimeout={}", seconds));
  option("Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com");
  // OpenSSH 9's default key exchange, sntrup761x25519, costs each end about
  // 0.1 s of CPU per connect; curve25519 is what the libssh2 client uses.
  option("KexAlgorithms=^curve25519-sha256,curve25519-sha256@libssh.org");
  switch (s_.policy) {
    case HostKeyPolicy::kStrict:
      option("StrictHostKeyChecking=yes");
      option("UserKnownHostsFile=" + config_path(s_.known_hosts));
      break;
    case HostKeyPolicy::kAcceptNew:
      option("StrictHostKeyChecking=accept-new");
      option("UserKnownHostsFile=" + config_path(s_.known_hosts));
      break;
    case HostKeyPolicy::kInsecure:
      option("StrictHostKeyChecking=no");
      option("UserKnownHostsFile=/dev/null");
      option("GlobalKnownHostsFile=/dev/null");
      option("LogLevel=ERROR");
      break;
  }
  for (const auto& key : s_.identity_files) option("IdentityFile=" + config_path(key));
  args.insert(args.end(),
              {"-p", std::to_string(s_.port), "-l", s_.user, "-s", "--", s_.host, "sftp"});
  return args;
}

Status OpenSshChannel::start() {
  if (s_.policy == HostKeyPolicy::kInsecure) {
    log::warn(kLog, "host key NOT checked (insecure policy) endpoint={}", s_.endpoint);
  } else if (s_.policy == HostKeyPolicy::kAcceptNew) {
    // ssh adds the key but creates no directory for the file.
    std::error_code ec;
    auto dir = std::filesystem::path(s_.known_hosts).parent_path();
    if (!dir.empty() && !std::filesystem::exists(dir, ec)) {
      std::filesystem::create_directories(dir, ec);
      std::filesystem::permissions(dir, std::filesystem::perms::owner_all, ec);
    }
  }

  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    return Status::transient(errno,
                             fmt::format("cannot create a socket pair: {}", errno_text(errno)));
  }
  io_.reset(pair[0]);
  UniqueFd child_io(pair[1]);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    return Status::transient(errno, fmt::format("cannot create a pipe: {}", errno_text(errno)));
  }
  err_.reset(pipe_fds[0]);
  UniqueFd child_err(pipe_fds[1]);

  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawnattr_init(&attr);
  ::posix_spawn_file_actions_adddup2(&actions, child_io.get(), STDIN_FILENO);
  ::posix_spawn_file_actions_adddup2(&actions, child_io.get(), STDOUT_FILENO);
  ::posix_spawn_file_actions_adddup2(&actions, child_err.get(), STDERR_FILENO);
  ::posix_spawn_file_actions_addclosefrom_np(&actions, STDERR_FILENO + 1);
  // Its own session: a terminal's ^C reaches the daemon, which then ends
  // its children itself. Default signal handling and no blocked signals,
  // whatever the spawning thread has.
  sigset_t none, defaults;
  ::sigemptyset(&none);
  ::sigemptyset(&defaults);
  for (int sig : {SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGCHLD}) ::sigaddset(&defaults, sig);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &defaults);
  ::posix_spawnattr_setflags(&attr,
                             POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  auto args = arguments();
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int rc = ::posix_spawnp(&pid_, s_.ssh_command.c_str(), &actions, &attr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    pid_ = -1;
    return Status::permanent(
        rc, fmt::format("cannot run the ssh client \"{}\": {} (install openssh-client, or use "
                        "--ssh-client libssh2)",
                        s_.ssh_command, errno_text(rc)));
  }
  ::fcntl(io_.get(), F_SETFL, ::fcntl(io_.get(), F_GETFL) | O_NONBLOCK);
  ::fcntl(err_.get(), F_SETFL, ::fcntl(err_.get(), F_GETFL) | O_NONBLOCK);
  connect_deadline_ = std::chrono::steady_clock::now() + s_.connect_timeout;
  return {};
}

OpenSshChannel::~OpenSshChannel() {
  io_.reset();
  stop_child();
}

void OpenSshChannel::stop_child() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  // ssh exits at once on SIGTERM; SIGKILL after half a second whatever it
  // is doing, so that tearing down never hangs.
  for (int i = 0; i < 100; ++i) {
    pid_t r = ::waitpid(pid_, nullptr, WNOHANG);
    if (r == pid_ || (r < 0 && errno != EINTR)) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::kill(pid_, SIGKILL);
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

void OpenSshChannel::read_stderr() {
  if (!err_) return;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(err_.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) err_.reset();  // ssh has exited (or closed its stderr)
      break;
    }
    partial_line_.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = partial_line_.find('\n')) != std::string::npos) {
      std::string line = partial_line_.substr(0, nl);
      partial_line_.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      log::info(kLog, "ssh endpoint={} says=\"{}\"", s_.endpoint, line);
      stderr_ += line + "\n";
      if (stderr_.size() > kStderrKept) stderr_.erase(0, stderr_.size() - kStderrKept);
    }
  }
}

Status OpenSshChannel::wait_for(short events) {
  // ssh writing to stderr is not progress: the deadline holds across it.
  const auto deadline =
      started_ ? std::chrono::steady_clock::now() + s_.stall_timeout : connect_deadline_;
  for (;;) {
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd pfds[3] = {{io_.get(), events, 0},
                      {err_ ? err_.get() : -1, POLLIN, 0},
                      {s_.cancellation ? s_.cancellation->fd() : -1, POLLIN, 0}};
    int ready = ::poll(pfds, 3, static_cast<int>(std::min<int64_t>(left.count(), INT32_MAX)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return Status::transient(errno, fmt::format("poll: {}", errno_text(errno)));
    if (ready == 0) break;
    if (pfds[2].revents) return shutting_down();
    if (pfds[1].revents) read_stderr();
    if (pfds[0].revents) return {};
  }
  if (!started_) {
    return Status::transient(ETIMEDOUT, fmt::format("cannot connect to {}: no answer within {} ms",
                                                    s_.login, s_.connect_timeout.count()));
  }
  return Status::transient(ETIMEDOUT, fmt::format("receiving on {}: no progress for {} ms",
                                                  s_.login, s_.stall_timeout.count()));
}

Status OpenSshChannel::write(std::span<const std::byte> data) {
  while (!data.empty()) {
    ssize_t n = ::send(io_.get(), data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data = data.subspan(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      auto st = wait_for(POLLOUT);
      if (!st.ok()) return st;
      continue;
    }
    return ended();
  }
  return {};
}

Status OpenSshChannel::read(std::span<std::byte> buf, size_t& got) {
  for (;;) {
    ssize_t n = ::recv(io_.get(), buf.data(), buf.size(), 0);
    if (n > 0) {
      got = static_cast<size_t>(n);
      started_ = true;
      return {};
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      auto st = wait_for(POLLIN);
      if (!st.ok()) return st;
      continue;
    }
    return ended();
  }
}

Status OpenSshChannel::ended() {
  io_.reset();
  // ssh exits right after closing the channel; its stderr closes with it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (err_ && std::chrono::steady_clock::now() < deadline) {
    pollfd pfd{err_.get(), POLLIN, 0};
    if (::poll(&pfd, 1, 100) > 0) read_stderr();
  }
  int status = 0;
  int exit_status = -1;
  if (pid_ > 0 && ::waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    if (WIFEXITED(status)) exit_status = WEXITSTATUS(status);
  }
  stop_child();
  if (!started_) return connect_error(exit_status);
  const auto last = last_line(stderr_);
  return Status::transient(ECONNRESET, fmt::format("receiving on {}: connection closed{}{}",
                                                   s_.login, last.empty() ? "" : ": ", last));
}

// ssh's messages (OpenSSH 8-9) for what stops a connection, in our wording.
Status OpenSshChannel::connect_error(int exit_status) const {
  const std::string_view text = stderr_;
  auto has = [&](std::string_view s) { return text.find(s) != std::string_view::npos; };
  std::string offered;
  if (auto at = text.find("SHA256:"); at != std::string_view::npos) {
    auto end = text.find_first_of(". \n", at);
    offered = fmt::format("; offered {}", text.substr(at, end - at));
  }
  if (has("REMOTE HOST IDENTIFICATION HAS CHANGED") || has("differs from the key")) {
    return Status::permanent(
        EACCES, fmt::format("host key for {} does not match the one in {}: refusing to connect "
                            "(possible man-in-the-middle{})",
                            s_.endpoint, s_.known_hosts, offered));
  }
  if (has("Host key verification failed")) {
    return Status::permanent(
        EACCES, fmt::format("host key for {} is not in {} (use --accept-new-host-key to add it{})",
                            s_.endpoint, s_.known_hosts, offered));
  }
  if (has("Permission denied (")) {
    std::string tried = ::getenv("SSH_AUTH_SOCK") ? "ssh-agent" : "";
    for (const auto& key : s_.identity_files) tried += (tried.empty() ? "" : ", ") + key;
    return Status::permanent(
        EACCES, fmt::format("authentication failed for {}@{} (tried: {}{}ssh's own defaults)",
                            s_.user, s_.endpoint, tried, tried.empty() ? "" : ", "));
  }
  if (has("subsystem request failed")) {
    return Status::permanent(EPROTO, fmt::format("{} runs no sftp subsystem (Subsystem sftp in its "
                                                 "sshd_config)",
                                                 s_.login));
  }
  // "ssh: connect to host H port P: Connection refused" and the like.
  static constexpr std::pair<std::string_view, int> kErrors[] = {
      {"Connection refused", ECONNREFUSED},
      {"Connection timed out", ETIMEDOUT},
      {"No route to host", EHOSTUNREACH},
      {"Network is unreachable", ENETUNREACH},
      {"Could not resolve hostname", EHOSTUNREACH},
      {"Connection reset", ECONNRESET},
      {"Connection closed", ECONNRESET},
  };
  for (auto [needle, errnum] : kErrors) {
    auto at = text.find(needle);
    if (at == std::string_view::npos) continue;
    auto line_start = text.rfind('\n', at);
    auto line = text.substr(line_start == std::string_view::npos ? 0 : line_start + 1);
    line = line.substr(0, line.find('\n'));
    std::string_view reason = errnum == EHOSTUNREACH && needle == "Could not resolve hostname"
                                  ? line.substr(line.rfind(": ") + 2)
                                  : needle;
    return Status::transient(errnum, fmt::format("cannot connect to {}: {}", s_.login, reason));
  }
  const auto last = last_line(text);
  return Status::transient(
      ECONNRESET, fmt::format("cannot connect to {}: ssh exited{}{}", s_.login,
                              exit_status >= 0 ? fmt::format(" with status {}", exit_status) : "",
                              last.empty() ? "" : fmt::format(" ({})", last)));
}

}  // namespace

Status open_openssh_channel(const SshSettings& s, std::unique_ptr<SshChannel>& out) {
  auto channel = std::make_unique<OpenSshChannel>(s);
  auto st = channel->start();
  if (st.ok()) out = std::move(channel);
  return st;
}

}  // namespace lazyfs::detail
