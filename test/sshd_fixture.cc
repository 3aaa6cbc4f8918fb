#include "sshd_fixture.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "lazyfs/fileio.h"

extern char** environ;

namespace lazyfs::test {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

const char* const kSshd = "/usr/sbin/sshd";
const char* const kSftpServer = "/usr/lib/openssh/sftp-server";

std::string read_text(const fs::path& file) {
  std::ifstream in(file);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::trunc);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + file.string());
}

// Runs argv[0] with stdout and stderr to `log`; throws unless it exits 0.
void run(const std::vector<std::string>& args, const fs::path& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  int rc = ::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error(fmt::format("cannot run {}", args[0]));
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error(fmt::format("{} failed: {}", args[0], read_text(log)));
  }
}

uint16_t free_port() {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (!fd || ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("cannot find a free port");
  }
  return ntohs(addr.sin_port);
}

bool port_accepts(uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  return fd && ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
}

// "TYPE BASE64" from a .pub file, without the comment.
std::string public_key(const fs::path& pub) {
  std::istringstream in(read_text(pub));
  std::string type, key;
  in >> type >> key;
  if (key.empty()) throw std::runtime_error("bad public key " + pub.string());
  return type + " " + key;
}

size_t count_lines_with(const std::string& text, std::string_view needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// Every process below `root` (not `root` itself), from /proc.
std::vector<pid_t> descendants(pid_t root) {
  std::multimap<pid_t, pid_t> children;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const auto name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    auto stat = read_text(entry.path() / "stat");
    auto paren = stat.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream fields(stat.substr(paren + 1));
    char state = 0;
    pid_t ppid = 0;
    fields >> state >> ppid;
    children.emplace(ppid, static_cast<pid_t>(std::stol(name)));
  }
  std::vector<pid_t> out;
  std::vector<pid_t> todo{root};
  while (!todo.empty()) {
    pid_t p = todo.back();
    todo.pop_back();
    auto [begin, end] = children.equal_range(p);
    for (auto it = begin; it != end; ++it) {
      out.push_back(it->second);
      todo.push_back(it->second);
    }
  }
  return out;
}

}  // namespace

SshServer::SshServer() : scratch_("sshd") {
  const auto& d = scratch_.path();
  auto keygen_log = d / "keygen.log";
  auto keygen = [&](const std::string& type, const fs::path& file) {
    run({"/usr/bin/ssh-keygen", "-q", "-t", type, "-N", "", "-C", "lazyfs-test", "-f",
         file.string()},
        keygen_log);
  };
  keygen("ed25519", d / "host_ed25519");
  keygen("ecdsa", d / "host_ecdsa");
  keygen("ed25519", d / "user_ed25519");
  keygen("ed25519", d / "other_ed25519");
  user_key_ = d / "user_ed25519";
  write_text(d / "authorized_keys", public_key(d / "user_ed25519.pub") + "\n");
  config_ = d / "sshd_config";
  known_hosts_ = d / "known_hosts";
  known_hosts_ecdsa_ = d / "known_hosts_ecdsa";
  wrong_known_hosts_ = d / "known_hosts_wrong";
  sshd_log_ = d / "sshd.log";
  sftp_log_ = d / "sftp-server.log";

  // The kernel may hand the free port to someone else before sshd binds it:
  // try a few.
  for (int attempt = 0;; ++attempt) {
    port_ = free_port();
    auto entry = fmt::format("[127.0.0.1]:{} ", port_);
    write_text(known_hosts_, entry + public_key(d / "host_ed25519.pub") + "\n");
    write_text(known_hosts_ecdsa_, entry + public_key(d / "host_ecdsa.pub") + "\n");
    write_text(wrong_known_hosts_, entry + public_key(d / "other_ed25519.pub") + "\n");
    // sftp-server's stderr goes to its own log (sshd runs the subsystem
    // through the shell, so the redirection works); O_APPEND keeps the lines
    // of concurrent sessions whole. HOME is this directory, so that the
    // shell, which bash started by sshd makes read ~/.bashrc, runs none of
    // the user's: a session killed with the server while an rc file held a
    // lock (pyenv's rehash lock, on a CI machine) left every later session
    // waiting for it, and every later test timing out.
    write_text(config_, fmt::format(R"(ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_ed25519
HostKey {dir}/host_ecdsa
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 100
MaxSessions 32
LogLevel INFO
SetEnv HOME={dir}
Subsystem sftp {sftp} -l INFO -e 2>>'{sftp_log}'
)",
                                    fmt::arg("port", port_), fmt::arg("dir", d.string()),
                                    fmt::arg("sftp", kSftpServer),
                                    fmt::arg("sftp_log", sftp_log_.string())));
    try {
      start();
      return;
    } catch (const std::exception&) {
      if (attempt >= 4) throw;
    }
  }
}

SshServer::~SshServer() {
  try {
    stop();
  } catch (...) {
  }
}

void SshServer::start() {
  if (pid_ > 0) return;
  // sshd's privilege separation directory.
  fs::create_directories("/run/sshd");
  ::chmod("/run/sshd", 0755);
  const size_t listening_before = count_lines_with(sshd_log(), "Server listening on");

  std::vector<std::string> args{kSshd, "-D", "-e", "-f", config_.string()};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = ::getpid();
  // fork and exec by hand rather than posix_spawn, for PR_SET_PDEATHSIG: a
  // test process that dies without running destructors (abort, sanitizer)
  // takes its sshd along. Only async-signal-safe calls after fork.
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    int in = ::open("/dev/null", O_RDONLY);
    int out = ::open("/dev/null", O_WRONLY);
    int err = ::open(sshd_log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (in < 0 || out < 0 || err < 0 || ::dup2(in, 0) < 0 || ::dup2(out, 1) < 0 ||
        ::dup2(err, 2) < 0) {
      ::_exit(127);
    }
    ::execv(kSshd, argv.data());
    ::_exit(127);
  }
  pid_ = pid;

  const auto deadline = std::chrono::steady_clock::now() + 15s;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("sshd exited at start: " + sshd_log());
    }
    if (count_lines_with(sshd_log(), "Server listening on") > listening_before &&
        port_accepts(port_)) {
      return;
    }
    std::this_thread::sleep_for(10ms);
  }
  stop();
  throw std::runtime_error("sshd did not start listening: " + sshd_log());
}

// Stops sshd and its sessions, walking the tree until no new process shows
// up, so nothing forks away while we look.
void SshServer::freeze_tree(std::vector<pid_t>& pids) {
  ::kill(pid_, SIGSTOP);
  std::set<pid_t> seen;
  for (int stable = 0; stable < 3;) {
    bool grew = false;
    for (pid_t p : descendants(pid_)) {
      if (seen.insert(p).second) {
        ::kill(p, SIGSTOP);
        grew = true;
      }
    }
    stable = grew ? 0 : stable + 1;
    if (!grew) std::this_thread::sleep_for(5ms);
  }
  pids.assign(seen.begin(), seen.end());
}

void SshServer::stop() {
  if (pid_ <= 0) return;
  std::vector<pid_t> pids;
  freeze_tree(pids);
  for (pid_t p : pids) ::kill(p, SIGKILL);
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  // The sessions were reparented; wait until they are gone or zombies, when
  // their sockets are closed.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  for (pid_t p : pids) {
    while (std::chrono::steady_clock::now() < deadline) {
      auto stat = read_text(fs::path("/proc") / std::to_string(p) / "stat");
      auto paren = stat.rfind(')');
      if (paren == std::string::npos || stat.substr(paren + 2, 1) == "Z") break;
      std::this_thread::sleep_for(5ms);
    }
  }
}

void SshServer::pause() {
  if (pid_ <= 0) return;
  std::vector<pid_t> pids;
  freeze_tree(pids);
}

void SshServer::resume() {
  if (pid_ <= 0) return;
  for (pid_t p : descendants(pid_)) ::kill(p, SIGCONT);
  ::kill(pid_, SIGCONT);
}

SftpOptions SshServer::options(SshClient client) const {
  SftpOptions o;
  o.client = client;
  o.user = "root";
  o.host = "127.0.0.1";
  o.port = port_;
  o.identity_files = {user_key_.string()};
  o.known_hosts = known_hosts_.string();
  o.host_key_policy = HostKeyPolicy::kStrict;
  o.connect_timeout = 10s;
  o.stall_timeout = 10s;
  return o;
}

std::string SshServer::sshd_log() const {
  return read_text(sshd_log_);
}
std::string SshServer::sftp_log() const {
  return read_text(sftp_log_);
}

uint64_t SshServer::bytes_read() const {
  return bytes_read("");
}

// Lines look like: close "/path/to/file" bytes read 16384 written 0
uint64_t SshServer::bytes_read(const std::string& remote_path) const {
  std::istringstream in(sftp_log());
  std::string line;
  uint64_t total = 0;
  const std::string_view open_quote = "close \"";
  const std::string_view after = "\" bytes read ";
  while (std::getline(in, line)) {
    auto start = line.find(open_quote);
    if (start == std::string::npos) continue;
    start += open_quote.size();
    auto stop_at = line.find(after, start);
    if (stop_at == std::string::npos) continue;
    if (!remote_path.empty() && line.substr(start, stop_at - start) != remote_path) continue;
    total += std::stoull(line.substr(stop_at + after.size()));
  }
  return total;
}

size_t SshServer::closes() const {
  return count_lines_with(sftp_log(), "\" bytes read ");
}

bool SshServer::wait_for_closes(size_t count, std::chrono::milliseconds limit) const {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (closes() < count) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

size_t SshServer::logins() const {
  return count_lines_with(sshd_log(), "Accepted publickey for");
}

}  // namespace lazyfs::test
