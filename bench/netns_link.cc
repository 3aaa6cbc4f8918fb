#include "netns_link.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <sstream>
#include <stdexcept>

#include "interrupt.h"
#include "process.h"

namespace lazyfs::bench {
namespace {

constexpr const char* kPrefix = "lzbench-";

std::vector<pid_t> pids_in(const std::string& netns) {
  auto r = run({"ip", "netns", "pids", netns}, cleanup_command());
  std::vector<pid_t> pids;
  std::istringstream in(r.out);
  long p;
  while (in >> p) pids.push_back(static_cast<pid_t>(p));
  return pids;
}

void kill_netns_processes(const std::string& netns) {
  for (int round = 0; round < 50; ++round) {
    auto pids = pids_in(netns);
    if (pids.empty()) return;
    for (pid_t p : pids) ::kill(p, SIGKILL);
    for (pid_t p : pids) wait_gone(p, std::chrono::milliseconds(200));
  }
}

// Namespaces named lzbench-PID whose PID is no longer a running harness.
void remove_stale_namespaces() {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/run/netns", ec)) {
    const auto name = e.path().filename().string();
    if (name.rfind(kPrefix, 0) != 0) continue;
    const auto pid_text = name.substr(std::string(kPrefix).size());
    if (pid_text.empty() || pid_text.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid == ::getpid() || process_alive(pid)) continue;
    fmt::print(stderr, "lazyfs-bench: removing stale network namespace {}\n", name);
    kill_netns_processes(name);
    run({"ip", "netns", "del", name}, cleanup_command());
  }
}

// A 169.254.N.0/30 no interface here uses yet.
std::string free_subnet() {
  const std::string used = run({"ip", "-o", "-4", "addr", "show"}).out;
  for (int n = 100 + ::getpid() % 100, tries = 0; tries < 150; ++tries, n = 100 + (n - 99) % 150) {
    const auto prefix = fmt::format("169.254.{}.", n);
    if (used.find(prefix) == std::string::npos) return prefix;
  }
  throw std::runtime_error("no free 169.254.N.0/30 subnet for the benchmark link");
}

}  // namespace

NetnsLink::NetnsLink() {
  remove_stale_namespaces();
  const auto pid = ::getpid();
  name_ = fmt::format("{}{}", kPrefix, pid);
  host_if_ = fmt::format("lzb{}h", pid);
  inner_if_ = fmt::format("lzb{}n", pid);
  const auto subnet = free_subnet();
  const auto host_addr = subnet + "1";
  inner_addr_ = subnet + "2";

  run_checked({"ip", "netns", "add", name_});
  cleanup_id_ = CleanupStack::push("network namespace " + name_, [this] { destroy(); });
  try {
    run_checked(
        {"ip", "link", "add", host_if_, "type", "veth", "peer", "name", inner_if_, "netns", name_});
    run_checked({"ip", "addr", "add", host_addr + "/30", "dev", host_if_});
    run_checked({"ip", "link", "set", host_if_, "up"});
    run_checked({"ip", "-n", name_, "addr", "add", inner_addr_ + "/30", "dev", inner_if_});
    run_checked({"ip", "-n", name_, "link", "set", inner_if_, "up"});
    run_checked({"ip", "-n", name_, "link", "set", "lo", "up"});
    fd_ = ::open(("/run/netns/" + name_).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("cannot open /run/netns/" + name_);
  } catch (...) {
    CleanupStack::run(cleanup_id_);  // the destructor will not run
    throw;
  }
}

NetnsLink::~NetnsLink() {
  CleanupStack::run(cleanup_id_);
}

void NetnsLink::kill_all() {
  kill_netns_processes(name_);
}

void NetnsLink::destroy() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  kill_netns_processes(name_);
  // The veth pair and both qdiscs go with the namespace.
  run({"ip", "netns", "del", name_}, cleanup_command());
  if (::access(("/sys/class/net/" + host_if_).c_str(), F_OK) == 0) {
    run({"ip", "link", "del", host_if_}, cleanup_command());
  }
}

void NetnsLink::shape(uint64_t rate_bps) {
  if (shaped_) {
    run({"tc", "qdisc", "del", "dev", host_if_, "root"}, cleanup_command());
    run({"tc", "-n", name_, "qdisc", "del", "dev", inner_if_, "root"}, cleanup_command());
    shaped_ = false;
  }
  if (rate_bps == 0) return;
  // The bucket holds at least 2 ms at the rate and never less than 64 KiB,
  // so segmentation-offloaded packets pass; the queue holds 100 ms.
  const uint64_t burst = std::max<uint64_t>(64 << 10, rate_bps / 8 / 500);
  const std::vector<std::string> tbf{
      "tbf",     "rate", fmt::format("{}bit", rate_bps), "burst", std::to_string(burst),
      "latency", "100ms"};
  std::vector<std::string> host{"tc", "qdisc", "add", "dev", host_if_, "root"};
  host.insert(host.end(), tbf.begin(), tbf.end());
  std::vector<std::string> inner{"tc", "-n", name_, "qdisc", "add", "dev", inner_if_, "root"};
  inner.insert(inner.end(), tbf.begin(), tbf.end());
  run_checked(host);
  shaped_ = true;
  run_checked(inner);
}

}  // namespace lazyfs::bench
