// HttpServer: a real nginx (Debian's) on 127.0.0.1 for the integration tests.
//
// Everything it uses is written under a scratch directory in the build tree:
// its own nginx.conf, the pid file, the error and access logs, the temp
// paths and, for HTTPS, a self-signed certificate made with openssl. The
// machine's /etc/nginx and port 80 are never touched. The ports are free
// ones picked by the kernel. nginx runs as one process (master_process off),
// so stopping it by its pid drops every connection it holds; it is killed
// when the thread that started it exits (PR_SET_PDEATHSIG), so keep a server
// on the thread that owns it. Needs /usr/sbin/nginx.
//
// What it serves: docroot() at http://127.0.0.1:port()/, and the same files
// under /norange/ with Range ignored (max_ranges 0: every GET is answered
// with the whole file). The access log records, per request, the connection
// number and the body bytes nginx sent, so a test can count TCP connections
// and tell whether a whole file went out.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "test_util.h"

namespace lazyfs::test {

class HttpServer {
 public:
  // Writes the config (and, with `tls`, a certificate) and starts nginx;
  // throws if it does not come up.
  explicit HttpServer(bool tls = false);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Starts nginx on the same ports; returns once they accept connections.
  void start();
  // Kills nginx by its pid and waits for it: established connections drop.
  void stop();
  // SIGSTOP / SIGCONT: a server that hangs without closing its connections.
  void pause();
  void resume();
  bool running() const { return pid_ > 0; }

  uint16_t port() const { return port_; }
  uint16_t tls_port() const { return tls_port_; }  // 0 without tls
  const std::filesystem::path& docroot() const { return docroot_; }
  // http://127.0.0.1:PORT + path (path starts with '/', or is empty).
  std::string url(const std::string& path = "") const;
  // https://127.0.0.1:TLS_PORT + path.
  std::string tls_url(const std::string& path = "") const;
  // The self-signed certificate, to trust as a CA file.
  const std::filesystem::path& certificate() const { return cert_; }

  struct Request {
    uint64_t connection = 0;  // nginx's connection serial number
    std::string method;
    std::string uri;  // as sent, still percent-encoded
    int status = 0;
    uint64_t body_bytes_sent = 0;
    std::string range;  // the Range header, "-" when none
  };
  // Every request logged so far (nginx logs a request once it ends).
  std::vector<Request> requests() const;
  // Waits (bounded) until at least `count` requests are logged.
  bool wait_for_requests(size_t count, std::chrono::milliseconds limit) const;
  std::string error_log() const;

 private:
  void write_config();

  ScratchDir scratch_;
  bool tls_;
  uint16_t port_ = 0;
  uint16_t tls_port_ = 0;
  pid_t pid_ = -1;
  std::filesystem::path docroot_;
  std::filesystem::path config_;
  std::filesystem::path cert_;
  std::filesystem::path key_;
  std::filesystem::path error_log_;
  std::filesystem::path access_log_;
};

}  // namespace lazyfs::test
