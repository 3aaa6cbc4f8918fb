// SftpSource: reads a checkpoint's files from the source host over SFTP.
//
// Each pooled connection is one SSH session with one SFTP channel, reused for
// every request it serves: never a handshake per request. The SSH session is
// OpenSSH's ssh client run as a child process (the default: its ciphers are
// several times cheaper per byte than libssh2 1.10's, and it honours
// ~/.ssh/config) or libssh2 inside this process. Either way lazyfs speaks
// SFTP itself on the channel. Reads
// are sent as pipelined SFTP READ requests covering exactly the asked range,
// so the server reads no byte past it (libcurl's SFTP, through libssh2's
// sftp_read, reads ahead up to four transfer buffers past a range's end).
//
// Authentication: ssh-agent, then the given identity files, or by default
// ~/.ssh/id_ed25519, id_ecdsa and id_rsa (the ssh client also tries what
// ~/.ssh/config names). Host keys are checked against a known_hosts file; an
// unknown or changed key refuses to connect unless the policy says otherwise.
// The ssh client runs with BatchMode (it never prompts).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lazyfs/source.h"

namespace lazyfs {

enum class HostKeyPolicy {
  kStrict,     // only keys already in known_hosts (the default)
  kAcceptNew,  // add an unknown host's key to known_hosts; refuse a changed one
  kInsecure,   // check nothing (logged loudly at every connect)
};

enum class SshClient {
  kOpenSsh,  // OpenSSH's ssh, one child process per session
  kLibssh2,  // libssh2 in this process
};

struct SftpOptions {
  SshClient client = SshClient::kOpenSsh;
  std::string ssh_command = "ssh";  // the OpenSSH client: a path, or a name looked up in PATH
  // ssh_config options ("Name=value") given to ssh before lazyfs's own, so
  // that they win (ssh keeps the first value it sees for an option).
  std::vector<std::string> ssh_options;
  std::string user;  // empty: $USER, or the name of the current uid
  std::string host;
  uint16_t port = 22;
  std::string root = "/";                   // remote root
  unsigned connections = 4;                 // pooled SSH sessions
  std::vector<std::string> identity_files;  // empty: agent, then ~/.ssh defaults
  std::string known_hosts;                  // empty: ~/.ssh/known_hosts
  HostKeyPolicy host_key_policy = HostKeyPolicy::kStrict;
  std::chrono::milliseconds connect_timeout{10000};
  // A request that makes no progress for this long fails (transient).
  std::chrono::milliseconds stall_timeout{10000};
};

// Parses "[USER@]HOST" or "sftp://[USER@]HOST[:PORT][/REMOTE_ROOT]" into
// `options` (user, host, port, root); false with `error` set otherwise.
bool parse_sftp_uri(const std::string& uri, SftpOptions& options, std::string& error);

// Connects the first session before returning, so that an unreachable host,
// a refused key or a failed login is reported at start (status says which
// host and why). Further sessions are opened on demand.
std::unique_ptr<Source> make_sftp_source(const SftpOptions& options, Status& status);

}  // namespace lazyfs
