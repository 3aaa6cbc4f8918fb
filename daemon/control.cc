#include "control.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <cstring>

#include "lazyfs/filesystem.h"
#include "lazyfs/hash.h"
#include "lazyfs/log.h"

namespace lazyfs::cli {

namespace {

bool make_address(const std::filesystem::path& path, sockaddr_un& addr) {
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  const auto& s = path.native();
  if (s.size() >= sizeof addr.sun_path) return false;
  std::memcpy(addr.sun_path, s.c_str(), s.size() + 1);
  return true;
}

}  // namespace

std::filesystem::path control_socket_path(const std::filesystem::path& mountpoint) {
  std::filesystem::path dir;
  if (::geteuid() == 0) {
    dir = "/run/lazyfs";
  } else if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg) {
    dir = std::filesystem::path(xdg) / "lazyfs";
  } else {
    dir = fmt::format("/tmp/lazyfs-{}", ::geteuid());
  }
  auto abs = std::filesystem::absolute(mountpoint).lexically_normal().string();
  while (abs.size() > 1 && abs.back() == '/') abs.pop_back();
  return dir / (sha256_hex(abs).substr(0, 24) + ".sock");
}

ControlServer::ControlServer(std::filesystem::path path, std::function<std::string(bool)> render,
                             Status& status)
    : path_(std::move(path)), render_(std::move(render)) {
  std::error_code ec;
  std::filesystem::create_directories(path_.parent_path(), ec);
  ::chmod(path_.parent_path().c_str(), 0700);
  sockaddr_un addr;
  if (!make_address(path_, addr)) {
    status = Status::permanent(ENAMETOOLONG, "control socket path too long: " + path_.string());
    return;
  }
  listen_fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int pipefd[2];
  if (!listen_fd_ || ::pipe2(pipefd, O_CLOEXEC) != 0) {
    status = Status::permanent(errno, fmt::format("control socket: {}", std::strerror(errno)));
    return;
  }
  wake_read_.reset(pipefd[0]);
  wake_write_.reset(pipefd[1]);
  ::unlink(path_.c_str());  // left by a daemon that was killed
  if (::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::chmod(path_.c_str(), 0600) != 0 || ::listen(listen_fd_.get(), 16) != 0) {
    status = Status::permanent(
        errno, fmt::format("control socket {}: {}", path_.string(), std::strerror(errno)));
    return;
  }
  status = {};
  thread_ = std::thread([this] { serve(); });
}

ControlServer::~ControlServer() {
  if (thread_.joinable()) {
    char b = 0;
    (void)!::write(wake_write_.get(), &b, 1);
    thread_.join();
  }
  if (listen_fd_) ::unlink(path_.c_str());
}

void ControlServer::serve() {
  while (true) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents) return;
    UniqueFd client(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!client) continue;
    try {
      // A client that stops writing or reading must not stall the server
      // for long.
      timeval tv{2, 0};
      ::setsockopt(client.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      ::setsockopt(client.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
      char what = 'f';
      if (::recv(client.get(), &what, 1, 0) != 1) what = 'f';
      const std::string doc = render_(what != 's');
      size_t done = 0;
      while (done < doc.size()) {
        ssize_t n = ::send(client.get(), doc.data() + done, doc.size() - done, MSG_NOSIGNAL);
        if (n <= 0) break;
        done += static_cast<size_t>(n);
      }
    } catch (const std::exception& e) {
      log::error("control", "status failed: {}", e.what());
    }
  }
}

Status query_control(const std::filesystem::path& mountpoint, std::string& out, bool with_files) {
  const auto path = control_socket_path(mountpoint);
  sockaddr_un addr;
  if (!make_address(path, addr)) return Status::permanent(ENAMETOOLONG, "socket path too long");
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::permanent(errno,
                             fmt::format("no lazyfs mount is serving {} (cannot reach {}: {})",
                                         mountpoint.string(), path.string(), std::strerror(errno)));
  }
  timeval tv{10, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  const char what = with_files ? 'f' : 's';
  if (::send(fd.get(), &what, 1, MSG_NOSIGNAL) != 1) {
    return Status::transient(errno, fmt::format("asking for status: {}", std::strerror(errno)));
  }
  out.clear();
  char buf[65536];
  while (true) {
    ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::transient(errno, fmt::format("reading status: {}", std::strerror(errno)));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return {};
}

}  // namespace lazyfs::cli

namespace lazyfs {

Status query_status(const std::filesystem::path& mountpoint, std::string& json, bool with_files) {
  return cli::query_control(mountpoint, json, with_files);
}

}  // namespace lazyfs
