// HttpSource: reads a checkpoint's files from an HTTP(S) server (nginx,
// Apache, an object store's HTTP endpoint) with ranged GETs, through libcurl.
//
// The file with image path P is fetched at BASE + P, each path component
// percent-encoded. stat is a HEAD: the size is the Content-Length, the mode
// S_IFREG|0444 (HTTP has no modes; the engine compares only the type and the
// size with the checkpoint) and the mtime the Last-Modified.
//
// Each pooled connection is one curl easy handle, reused so that its
// keep-alive connection persists: never a handshake per request.
//
// A file must not change under a mount: the first stat of a path remembers
// its validators (ETag, Last-Modified), and every read sends them back
// (If-Match / If-Unmodified-Since and If-Range). A server that answers a
// ranged GET with the whole file (it ignores Range, or the file changed) is
// refused at the response headers, before its body is read.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "lazyfs/source.h"

namespace lazyfs {

struct HttpOptions {
  // http://[USER:PASSWORD@]HOST[:PORT][/PREFIX] or https://...; the prefix
  // is taken as written (already percent-encoded).
  std::string base_url;
  unsigned connections = 4;  // pooled keep-alive connections
  std::string ca_file;       // https: trust the CAs in this PEM file, not the system's
  bool insecure = false;     // https: check neither the certificate nor the host name
  std::chrono::milliseconds connect_timeout{10000};
  // A request that makes no progress for this long fails (transient).
  std::chrono::milliseconds stall_timeout{10000};
  std::string user_agent;  // empty: lazyfs/VERSION
};

// Sends one HEAD of BASE/ before returning, so that a bad URL, an unreachable
// server or an untrusted certificate is reported at start (status says which
// server and why). Any HTTP answer, even an error, counts as reachable.
std::unique_ptr<Source> make_http_source(const HttpOptions& options, Status& status);

}  // namespace lazyfs
