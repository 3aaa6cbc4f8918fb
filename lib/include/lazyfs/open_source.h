// Sources by URI: what `lazyfs mount SOURCE` accepts, for embedders too.
//   [USER@]HOST, sftp://[USER@]HOST[:PORT][/ROOT]   SFTP (sftp_source.h)
//   http(s)://HOST[:PORT][/ROOT]                    ranged GETs (http_source.h)
//   file:///DIR                                     a local directory
// An embedder with another store implements Source (source.h) itself.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lazyfs/sftp_source.h"
#include "lazyfs/source.h"

namespace lazyfs {

struct SourceOptions {
  unsigned connections = 4;
  std::vector<std::string> identity_files;  // SFTP: empty = agent, then ~/.ssh defaults
  std::string known_hosts;                  // SFTP: empty = ~/.ssh/known_hosts
  HostKeyPolicy host_key_policy = HostKeyPolicy::kStrict;
  SshClient ssh_client = SshClient::kOpenSsh;  // SFTP: OpenSSH's ssh, or libssh2
  std::string ssh_command = "ssh";             // SFTP: the OpenSSH client program
  std::vector<std::string> ssh_options;        // SFTP: ssh -o options, ahead of lazyfs's
  std::string ca_file;  // HTTPS: trust the CAs in this PEM file; empty = the system's
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds stall_timeout{10000};
};

// Opens the source `uri` names; null with `status` (one line saying which
// host and why) if it cannot. Network sources connect before returning.
std::unique_ptr<Source> open_source(const std::string& uri, const SourceOptions& options,
                                    Status& status);

}  // namespace lazyfs
