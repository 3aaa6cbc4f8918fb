// The benchmark's own OpenSSH server: generated host and user keys,
// authorized_keys and config under a scratch directory (never ~/.ssh or
// /etc/ssh), sshd run as `sshd -D -e -f CONFIG` inside the NetnsLink's
// namespace, listening on its inner address, port 22. Clients reach it only
// through the DelayRelay, so known_hosts names the relay's 127.0.0.1 port.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "process.h"

namespace lazyfs::bench {

class NetnsLink;

class SshServer {
 public:
  // Generates keys and config in `dir` (created) and starts sshd in `link`'s
  // namespace; throws if it does not come up. SFTP sessions run
  // `sftp_server`: a program's path, started (as sshd does) through the
  // user's login shell, or "internal-sftp", inside sshd without a shell.
  // Sessions get HOME=`dir`, so the shell runs none of the user's rc files
  // (a session killed while one held a lock, pyenv's, hung every later one).
  SshServer(const std::filesystem::path& dir, NetnsLink& link, const std::string& sftp_server);
  ~SshServer();
  SshServer(const SshServer&) = delete;
  SshServer& operator=(const SshServer&) = delete;

  // Writes known_hosts for clients that connect to 127.0.0.1:`port`.
  void trust_at(uint16_t port);

  const std::filesystem::path& user_key() const { return user_key_; }
  const std::filesystem::path& known_hosts() const { return known_hosts_; }
  // `-o` options for OpenSSH's clients (ssh, scp, sftp): no config file,
  // this key only, this known_hosts only, never a prompt.
  std::vector<std::string> client_options() const;
  std::string log() const;

 private:
  void stop();

  std::filesystem::path dir_;
  NetnsLink& link_;
  std::filesystem::path user_key_;
  std::filesystem::path known_hosts_;
  std::filesystem::path log_;
  Child sshd_;
  int cleanup_id_ = 0;
};

}  // namespace lazyfs::bench
