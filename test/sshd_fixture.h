// SshServer: a real OpenSSH sshd on 127.0.0.1 for the integration tests.
//
// Everything it uses is generated under a scratch directory in the build
// tree (host keys, a user key, authorized_keys, known_hosts, the config, the
// logs); the machine's own ~/.ssh and /etc/ssh are never read or written.
// The port is a free one picked by the kernel, so several test processes can
// run at once. Needs root (sshd's privilege separation) and /usr/sbin/sshd.
// sshd is killed when the thread that started it exits (PR_SET_PDEATHSIG),
// so keep a server on the thread that owns it.
//
// The sftp subsystem is OpenSSH's sftp-server with INFO logging sent to a
// file, so a test can tell how many bytes the server read from each file it
// closed: the over-read check. (sftp-server's stderr would otherwise travel
// to the client as channel extended data, not to sshd's log.)
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "lazyfs/sftp_source.h"
#include "test_util.h"

namespace lazyfs::test {

class SshServer {
 public:
  // Generates keys and config and starts sshd; throws if it does not come up.
  SshServer();
  ~SshServer();
  SshServer(const SshServer&) = delete;
  SshServer& operator=(const SshServer&) = delete;

  // Starts sshd on the same port with the same keys; returns once the port
  // accepts connections.
  void start();
  // Kills sshd and every session process it forked (they outlive the
  // listener otherwise), so established connections drop too.
  void stop();
  void restart() {
    stop();
    start();
  }
  // SIGSTOP / SIGCONT to sshd and all its sessions: a server that hangs
  // without closing its connections.
  void pause();
  void resume();
  bool running() const { return pid_ > 0; }

  uint16_t port() const { return port_; }
  const std::filesystem::path& dir() const { return scratch_.path(); }
  const std::filesystem::path& user_key() const { return user_key_; }
  // known_hosts with this server's ed25519 host key, as OpenSSH writes it.
  const std::filesystem::path& known_hosts() const { return known_hosts_; }
  // known_hosts with only the server's ECDSA key (libssh2 prefers ECDSA).
  const std::filesystem::path& known_hosts_ecdsa() const { return known_hosts_ecdsa_; }
  // known_hosts naming this host and port with some other key.
  const std::filesystem::path& wrong_known_hosts() const { return wrong_known_hosts_; }

  // Ready to connect as root with the user key and known_hosts.
  SftpOptions options(SshClient client = SshClient::kOpenSsh) const;

  // Sum of "bytes read" over sftp-server's closes, all files or one file.
  uint64_t bytes_read() const;
  uint64_t bytes_read(const std::string& remote_path) const;
  // How many files sftp-server closed (each logs its bytes when closed).
  size_t closes() const;
  // Waits (bounded) until at least `count` closes are logged.
  bool wait_for_closes(size_t count, std::chrono::milliseconds limit) const;
  // Successful logins ("Accepted publickey") since the first start.
  size_t logins() const;

  std::string sshd_log() const;
  std::string sftp_log() const;

 private:
  void freeze_tree(std::vector<pid_t>& pids);

  ScratchDir scratch_;
  uint16_t port_ = 0;
  pid_t pid_ = -1;
  std::filesystem::path config_;
  std::filesystem::path user_key_;
  std::filesystem::path known_hosts_;
  std::filesystem::path known_hosts_ecdsa_;
  std::filesystem::path wrong_known_hosts_;
  std::filesystem::path sshd_log_;
  std::filesystem::path sftp_log_;
};

}  // namespace lazyfs::test
