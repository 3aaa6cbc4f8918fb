#include "delay_relay.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/core.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <vector>

#include "process.h"

namespace lazyfs::bench {
namespace {

// A direction stops reading while this much is queued (the tbf below the
// relay bounds it long before that on shaped links).
constexpr size_t kMaxQueued = 64u << 20;
constexpr size_t kReadSize = 256u << 10;

void set_nodelay_nonblock(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
}

struct Chunk {
  uint64_t due_ns;
  std::vector<char> data;
  size_t done = 0;
};

}  // namespace

struct DelayRelay::Connection {
  int client = -1;
  int server = -1;
  int64_t delay_us = 0;
  std::atomic<int> pumps_left{2};
  ~Connection() {
    if (client >= 0) ::close(client);
    if (server >= 0) ::close(server);
  }
};

DelayRelay::DelayRelay(std::string target_addr, uint16_t target_port)
    : target_addr_(std::move(target_addr)), target_port_(target_port) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  if (listen_fd_ < 0 || ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 ||
      ::listen(listen_fd_, 128) != 0 ||
      ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&sa), &len) != 0) {
    throw std::runtime_error(fmt::format("relay: cannot listen: {}", std::strerror(errno)));
  }
  port_ = ntohs(sa.sin_port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

DelayRelay::~DelayRelay() {
  stop();
}

void DelayRelay::stop() {
  if (stopping_.exchange(true)) return;
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  std::lock_guard lock(threads_mu_);
  for (auto& w : threads_) w.thread.join();
  threads_.clear();
}

DelayRelay::Counters DelayRelay::counters() const {
  return {to_server_.load(), to_client_.load(), connections_.load()};
}

void DelayRelay::reset_counters() {
  to_server_ = 0;
  to_client_ = 0;
  connections_ = 0;
}

void DelayRelay::accept_loop() {
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    int client = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    auto c = std::make_shared<Connection>();
    c->client = client;
    c->delay_us = delay_us_.load();
    c->server = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(target_port_);
    ::inet_pton(AF_INET, target_addr_.c_str(), &sa.sin_addr);
    if (c->server < 0 || ::connect(c->server, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      continue;  // the client sees the connection close
    }
    set_nodelay_nonblock(c->client);
    set_nodelay_nonblock(c->server);
    ++connections_;
    open_ += 1;
    std::lock_guard lock(threads_mu_);
    // Join the threads of connections that have ended.
    for (auto it = threads_.begin(); it != threads_.end();) {
      if (it->done->load()) {
        it->thread.join();
        it = threads_.erase(it);
      } else {
        ++it;
      }
    }
    for (bool to_server : {true, false}) {
      auto done = std::make_shared<std::atomic<bool>>(false);
      threads_.push_back({std::thread([this, c, to_server, done] {
                            pump(c, to_server);
                            *done = true;
                          }),
                          done});
    }
  }
}

// Moves one direction of `c`: read what arrives, hold it for the delay,
// write it out in order. Ends when the source has closed and all is written
// (then half-closes the destination), on an error, or on stop().
void DelayRelay::pump(const std::shared_ptr<Connection>& c, bool to_server) {
  const int src = to_server ? c->client : c->server;
  const int dst = to_server ? c->server : c->client;
  auto& counter = to_server ? to_server_ : to_client_;
  const uint64_t delay_ns = static_cast<uint64_t>(c->delay_us) * 1000;
  std::deque<Chunk> queue;
  size_t queued = 0;
  bool eof = false;
  bool failed = false;
  while (!stopping_ && !failed) {
    const uint64_t now = monotonic_ns();
    const bool due = !queue.empty() && queue.front().due_ns <= now;
    if (eof && queue.empty()) break;
    pollfd fds[2];
    nfds_t n = 0;
    int src_i = -1, dst_i = -1;
    if (!eof && queued < kMaxQueued) {
      src_i = static_cast<int>(n);
      fds[n++] = {src, POLLIN, 0};
    }
    if (due) {
      dst_i = static_cast<int>(n);
      fds[n++] = {dst, POLLOUT, 0};
    }
    // Wake for the next chunk's due time, and at least every 100 ms to see
    // stop().
    uint64_t wait_ns = 100'000'000;
    if (!queue.empty() && !due) wait_ns = std::min(wait_ns, queue.front().due_ns - now);
    timespec ts{static_cast<time_t>(wait_ns / 1000000000ull),
                static_cast<long>(wait_ns % 1000000000ull)};
    int rc = ::ppoll(fds, n, &ts, nullptr);
    if (rc < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (src_i >= 0 && fds[src_i].revents) {
      std::vector<char> buf(kReadSize);
      ssize_t got = ::read(src, buf.data(), buf.size());
      if (got > 0) {
        buf.resize(static_cast<size_t>(got));
        counter += static_cast<uint64_t>(got);
        queued += buf.size();
        const uint64_t arrival = monotonic_ns();
        queue.push_back({arrival + delay_ns, std::move(buf), 0});
      } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
        eof = true;
      }
    }
    if (dst_i >= 0 && (fds[dst_i].revents & (POLLOUT | POLLERR | POLLHUP))) {
      while (!queue.empty() && queue.front().due_ns <= monotonic_ns()) {
        auto& ch = queue.front();
        ssize_t put = ::send(dst, ch.data.data() + ch.done, ch.data.size() - ch.done, MSG_NOSIGNAL);
        if (put < 0) {
          if (errno != EAGAIN && errno != EINTR) failed = true;
          break;
        }
        ch.done += static_cast<size_t>(put);
        if (ch.done < ch.data.size()) break;
        queued -= ch.data.size();
        queue.pop_front();
      }
    }
  }
  if (failed) {
    // The other end is gone: make the reader of this direction's source
    // see it too.
    ::shutdown(src, SHUT_RD);
    ::shutdown(dst, SHUT_RDWR);
  } else {
    ::shutdown(dst, SHUT_WR);
  }
  if (--c->pumps_left == 0) open_ -= 1;
}

}  // namespace lazyfs::bench
