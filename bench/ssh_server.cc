#include "ssh_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "interrupt.h"
#include "netns_link.h"

namespace lazyfs::bench {
namespace {

namespace fs = std::filesystem;

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

std::string public_key(const fs::path& pub) {
  std::istringstream in(read_text(pub));
  std::string type, key;
  in >> type >> key;
  if (key.empty()) throw std::runtime_error("bad public key " + pub.string());
  return type + " " + key;
}

bool accepts(const std::string& addr, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  ::inet_pton(AF_INET, addr.c_str(), &sa.sin_addr);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

SshServer::SshServer(const fs::path& dir, NetnsLink& link, const std::string& sftp_server)
    : dir_(dir), link_(link) {
  fs::create_directories(dir_);
  for (const auto* type : {"ed25519", "ecdsa"}) {
    run_checked({"ssh-keygen", "-q", "-t", type, "-N", "", "-C", "lazyfs-bench", "-f",
                 (dir_ / fmt::format("host_{}", type)).string()});
  }
  user_key_ = dir_ / "user_ed25519";
  run_checked({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lazyfs-bench", "-f",
               user_key_.string()});
  write_text(dir_ / "authorized_keys", public_key(dir_ / "user_ed25519.pub") + "\n");
  known_hosts_ = dir_ / "known_hosts";
  log_ = dir_ / "sshd.log";
  const auto config = dir_ / "sshd_config";
  write_text(config, fmt::format(R"(ListenAddress {addr}
Port 22
HostKey {dir}/host_ed25519
HostKey {dir}/host_ecdsa
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PermitUserRC no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 100
MaxSessions 64
LogLevel INFO
SetEnv HOME={dir}
Subsystem sftp {sftp}
)",
                                 fmt::arg("addr", link.inner_address()),
                                 fmt::arg("dir", dir_.string()), fmt::arg("sftp", sftp_server)));

  // sshd's privilege separation directory; removed again if we made it.
  if (!fs::exists("/run/sshd")) {
    fs::create_directories("/run/sshd");
    ::chmod("/run/sshd", 0755);
    CleanupStack::push("/run/sshd", [] {
      std::error_code ec;
      fs::remove("/run/sshd", ec);  // only if still empty
    });
  }
  SpawnOptions o;
  o.netns_fd = link.fd();
  o.stderr_file = log_;
  o.die_with_parent = true;
  const auto sshd = find_program("sshd");
  if (!sshd) throw std::runtime_error("sshd not found (install openssh-server)");
  sshd_ = spawn({sshd->string(), "-D", "-e", "-f", config.string()}, o);
  cleanup_id_ = CleanupStack::push("sshd", [this] { stop(); });
  try {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
    for (;;) {
      check_interrupted();
      ProcessResult r;
      if (sshd_.try_wait(r)) throw std::runtime_error("sshd exited at start: " + log());
      if (log().find("Server listening on") != std::string::npos &&
          accepts(link.inner_address(), 22)) {
        return;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        throw std::runtime_error("sshd did not start listening: " + log());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  } catch (...) {
    CleanupStack::run(cleanup_id_);  // the destructor will not run
    throw;
  }
}

SshServer::~SshServer() {
  CleanupStack::run(cleanup_id_);
}

void SshServer::stop() {
  sshd_.signal_group(SIGKILL);
  sshd_ = Child();  // reaps it
  // Its per-connection children call setsid(): they are found by namespace.
  link_.kill_all();
}

void SshServer::trust_at(uint16_t port) {
  const auto entry = fmt::format("[127.0.0.1]:{} ", port);
  write_text(known_hosts_, entry + public_key(dir_ / "host_ed25519.pub") + "\n" + entry +
                               public_key(dir_ / "host_ecdsa.pub") + "\n");
}

std::vector<std::string> SshServer::client_options() const {
  return {"-F", "/dev/null",
          "-o", "IdentityFile=" + user_key_.string(),
          "-o", "IdentitiesOnly=yes",
          "-o", "UserKnownHostsFile=" + known_hosts_.string(),
          "-o", "GlobalKnownHostsFile=/dev/null",
          "-o", "StrictHostKeyChecking=yes",
          "-o", "BatchMode=yes",
          "-o", "LogLevel=ERROR",
          "-o", "ConnectTimeout=30"};
}

std::string SshServer::log() const {
  return read_text(log_);
}

}  // namespace lazyfs::bench
