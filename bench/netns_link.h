// The shaped link between the harness and its sshd: a network namespace the
// harness creates (lzbench-PID), joined to this one by a veth pair with
// link-local addresses (169.254.N.1 here, .2 inside), and a tbf qdisc on
// each end's egress for the rate. Delay is not added here (no netem on this
// kernel) but by the DelayRelay in front of it. Nothing else's traffic
// crosses these interfaces, so shaping them disturbs no other process.
// Deleting the namespace removes both veth ends and their qdiscs.
#pragma once

#include <cstdint>
#include <string>

namespace lazyfs::bench {

class NetnsLink {
 public:
  // Creates the namespace and the veth pair; removes namespaces left by
  // earlier runs whose harness is gone. Throws with the failing command.
  NetnsLink();
  ~NetnsLink();
  NetnsLink(const NetnsLink&) = delete;
  NetnsLink& operator=(const NetnsLink&) = delete;

  // Rate in bits per second for both directions; 0 removes the shaping.
  void shape(uint64_t rate_bps);

  const std::string& name() const { return name_; }
  // The sshd side's address (inside the namespace).
  const std::string& inner_address() const { return inner_addr_; }
  // An fd of the namespace for setns().
  int fd() const { return fd_; }
  // Kills every process inside the namespace (sshd and its sessions).
  void kill_all();

 private:
  void destroy();

  std::string name_;
  std::string host_if_, inner_if_;
  std::string inner_addr_;
  int fd_ = -1;
  int cleanup_id_ = 0;
  bool shaped_ = false;
};

}  // namespace lazyfs::bench
