// DelayRelay: a TCP relay on 127.0.0.1 in front of the benchmark's sshd that
// adds the link's latency and counts what crosses it. Each accepted
// connection gets its own connection to the target and one thread per
// direction; a thread reads whatever arrives, stamps it with arrival time +
// one-way delay, and writes it out in order once that time has come, so a
// round trip through the relay takes the configured RTT on top of the path's
// own. Every method connects here, so the byte counters are the link's
// traffic (SSH framing, encryption and handshakes included).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace lazyfs::bench {

class DelayRelay {
 public:
  // Listens on 127.0.0.1 (a port the kernel picks); forwards to
  // target_addr:target_port.
  DelayRelay(std::string target_addr, uint16_t target_port);
  ~DelayRelay();
  DelayRelay(const DelayRelay&) = delete;
  DelayRelay& operator=(const DelayRelay&) = delete;

  uint16_t port() const { return port_; }
  // Applies to connections accepted from now on.
  void set_one_way_delay(std::chrono::microseconds delay) { delay_us_ = delay.count(); }

  struct Counters {
    uint64_t to_server = 0;  // client to sshd
    uint64_t to_client = 0;  // sshd to client
    uint64_t connections = 0;
  };
  Counters counters() const;
  void reset_counters();
  // Connections still open (for waiting until a client has really gone).
  size_t open_connections() const { return open_.load(); }

  void stop();

 private:
  struct Connection;
  void accept_loop();
  void pump(const std::shared_ptr<Connection>& c, bool to_server);

  std::string target_addr_;
  uint16_t target_port_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> delay_us_{0};
  std::atomic<uint64_t> to_server_{0}, to_client_{0}, connections_{0};
  std::atomic<size_t> open_{0};
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex threads_mu_;
  std::list<Worker> threads_;
  std::thread acceptor_;
};

}  // namespace lazyfs::bench
