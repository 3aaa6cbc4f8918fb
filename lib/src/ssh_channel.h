// The byte stream an SFTP session runs on: the stdin and stdout of the "sftp"
// subsystem on the source host, reached either through OpenSSH's ssh client
// (a child process, the default) or through libssh2 inside this process.
//
// SftpSource speaks SFTP itself on top; a channel only moves bytes, connects
// (host key check, authentication, subsystem start) and maps its failures to
// Status values with the same wording whichever client is used.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "cancellation.h"
#include "lazyfs/fileio.h"
#include "lazyfs/sftp_source.h"
#include "lazyfs/source.h"

namespace lazyfs::detail {

// What every session of a source needs, resolved once.
struct SshSettings {
  SshClient client = SshClient::kOpenSsh;
  std::string ssh_command;               // the OpenSSH client program
  std::vector<std::string> ssh_options;  // -o options, ahead of lazyfs's own
  std::string user;
  std::string host;
  uint16_t port = 22;
  std::string root;  // without a trailing slash: "" for "/"
  unsigned connections = 4;
  std::vector<std::string> identity_files;
  std::string known_hosts;
  HostKeyPolicy policy = HostKeyPolicy::kStrict;
  std::chrono::milliseconds connect_timeout{};
  std::chrono::milliseconds stall_timeout{};
  std::string endpoint;                  // host:port, for messages
  std::string login;                     // sftp://user@host:port, for messages
  std::string uri;                       // login + root, for describe()
  Cancellation* cancellation = nullptr;  // the source's; outlives its sessions
};

class SshChannel {
 public:
  virtual ~SshChannel() = default;

  // Sends all of `data`. A failure leaves the channel unusable.
  virtual Status write(std::span<const std::byte> data) = 0;
  // Reads at least one byte into `buf` (`got` says how many), waiting at
  // most the stall time-out (ETIMEDOUT). A failure leaves the channel
  // unusable.
  virtual Status read(std::span<std::byte> buf, size_t& got) = 0;
  // The channel failed: tear it down without waiting for the peer.
  virtual void abandon() = 0;
};

// Connects, checks the host key, logs in and starts the sftp subsystem
// within the connect time-out. `known_hosts_mu` serialises reading and
// appending the known_hosts file among a source's sessions.
Status open_libssh2_channel(const SshSettings& s, std::mutex& known_hosts_mu,
                            std::unique_ptr<SshChannel>& out);
// Starts ssh, which connects, checks the host key and logs in by itself: a
// failure shows at the first read (the caller's wait for the SFTP VERSION),
// bounded by the connect time-out.
Status open_openssh_channel(const SshSettings& s, std::unique_ptr<SshChannel>& out);

std::string errno_text(int errnum);

}  // namespace lazyfs::detail
