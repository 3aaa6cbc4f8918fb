#include "lazyfs/open_source.h"

#include <fmt/core.h>

#include <cerrno>

#include "lazyfs/http_source.h"

namespace lazyfs {

std::unique_ptr<Source> open_source(const std::string& uri, const SourceOptions& options,
                                    Status& status) {
  if (uri.rfind("file://", 0) == 0) return make_local_source(uri.substr(7), status);
  if (uri.rfind("http://", 0) == 0 || uri.rfind("https://", 0) == 0) {
    HttpOptions http;
    http.base_url = uri;
    http.connections = options.connections;
    http.ca_file = options.ca_file;
    http.connect_timeout = options.connect_timeout;
    http.stall_timeout = options.stall_timeout;
    return make_http_source(http, status);
  }
  SftpOptions sftp;
  std::string error;
  if (!parse_sftp_uri(uri, sftp, error)) {
    status = Status::permanent(EINVAL, fmt::format("source {}: {}", uri, error));
    return nullptr;
  }
  sftp.connections = options.connections;
  sftp.identity_files = options.identity_files;
  sftp.known_hosts = options.known_hosts;
  sftp.host_key_policy = options.host_key_policy;
  sftp.client = options.ssh_client;
  sftp.ssh_command = options.ssh_command;
  sftp.ssh_options = options.ssh_options;
  sftp.connect_timeout = options.connect_timeout;
  sftp.stall_timeout = options.stall_timeout;
  return make_sftp_source(sftp, status);
}

}  // namespace lazyfs
