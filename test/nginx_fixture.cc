#include "nginx_fixture.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "lazyfs/fileio.h"

namespace lazyfs::test {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

const char* const kNginx = "/usr/sbin/nginx";

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

}  // namespace

HttpServer::HttpServer(bool tls) : scratch_("nginx"), tls_(tls) {
  const auto& d = scratch_.path();
  docroot_ = d / "www";
  fs::create_directories(docroot_);
  fs::create_directories(d / "tmp");
  config_ = d / "nginx.conf";
  error_log_ = d / "error.log";
  access_log_ = d / "access.log";
  if (tls_) {
    cert_ = d / "cert.pem";
    key_ = d / "key.pem";
    auto r =
        run_program("/usr/bin/openssl",
                    {"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                     "-nodes", "-keyout", key_.string(), "-out", cert_.string(), "-days", "2",
                     "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"});
    if (r.status != 0) throw std::runtime_error("openssl req failed: " + r.err);
  }
  // The kernel may hand a free port to someone else before nginx binds it:
  // try a few.
  for (int attempt = 0;; ++attempt) {
    port_ = free_port();
    if (tls_) {
      do {
        tls_port_ = free_port();
      } while (tls_port_ == port_);
    }
    write_config();
    try {
      start();
      return;
    } catch (const std::exception&) {
      if (attempt >= 4) throw;
    }
  }
}

HttpServer::~HttpServer() {
  try {
    stop();
  } catch (...) {
  }
}

void HttpServer::write_config() {
  const auto& d = scratch_.path();
  std::string tls;
  if (tls_) {
    tls = fmt::format(
        "    listen 127.0.0.1:{} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n",
        tls_port_, cert_.string(), key_.string());
  }
  // One process, so that its pid is the whole server; logs, pid and temp
  // files under the scratch directory; keep-alive long enough for any test.
  write_text(config_, fmt::format(R"({user}master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 512;
}}
http {{
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    log_format lazyfs '$connection $request_method $request_uri $status $body_bytes_sent "$http_range"';
    access_log {dir}/access.log lazyfs;
    server {{
        listen 127.0.0.1:{port};
{tls}        root {root};
        location /norange/ {{
            alias {root}/;
            max_ranges 0;
        }}
    }}
}}
)",
                                  fmt::arg("user", ::geteuid() == 0 ? "user root;\n" : ""),
                                  fmt::arg("dir", d.string()), fmt::arg("port", port_),
                                  fmt::arg("tls", tls), fmt::arg("root", docroot_.string())));
}

void HttpServer::start() {
  if (pid_ > 0) return;
  const auto prefix = scratch_.path().string() + "/";
  std::vector<std::string> args{
      kNginx, "-p", prefix, "-e", error_log_.string(), "-c", config_.string(), "-g", "daemon off;"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = ::getpid();
  // fork and exec by hand rather than posix_spawn, for PR_SET_PDEATHSIG: a
  // test process that dies without running destructors takes its nginx
  // along. Only async-signal-safe calls after fork.
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    int in = ::open("/dev/null", O_RDONLY);
    int out = ::open(error_log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (in < 0 || out < 0 || ::dup2(in, 0) < 0 || ::dup2(out, 1) < 0 || ::dup2(out, 2) < 0) {
      ::_exit(127);
    }
    ::execv(kNginx, argv.data());
    ::_exit(127);
  }
  pid_ = pid;

  const auto deadline = std::chrono::steady_clock::now() + 15s;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("nginx exited at start: " + error_log());
    }
    if (port_accepts(port_) && (!tls_ || port_accepts(tls_port_))) return;
    std::this_thread::sleep_for(10ms);
  }
  stop();
  throw std::runtime_error("nginx did not start listening: " + error_log());
}

void HttpServer::stop() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGCONT);  // in case it was paused
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

void HttpServer::pause() {
  if (pid_ > 0) ::kill(pid_, SIGSTOP);
}

void HttpServer::resume() {
  if (pid_ > 0) ::kill(pid_, SIGCONT);
}

std::string HttpServer::url(const std::string& path) const {
  return fmt::format("http://127.0.0.1:{}{}", port_, path);
}

std::string HttpServer::tls_url(const std::string& path) const {
  return fmt::format("https://127.0.0.1:{}{}", tls_port_, path);
}

std::string HttpServer::error_log() const {
  return read_text(error_log_);
}

// Lines look like: 7 GET /a%20b/c 206 4096 "bytes=0-4095"
std::vector<HttpServer::Request> HttpServer::requests() const {
  std::istringstream in(read_text(access_log_));
  std::vector<Request> out;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    Request r;
    std::string range;
    if (!(fields >> r.connection >> r.method >> r.uri >> r.status >> r.body_bytes_sent >> range)) {
      continue;
    }
    if (range.size() >= 2 && range.front() == '"' && range.back() == '"') {
      range = range.substr(1, range.size() - 2);
    }
    r.range = range;
    out.push_back(std::move(r));
  }
  return out;
}

bool HttpServer::wait_for_requests(size_t count, std::chrono::milliseconds limit) const {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (requests().size() < count) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

}  // namespace lazyfs::test
