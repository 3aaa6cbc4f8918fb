// Running the programs a benchmark drives (ssh clients, sshd, ip, tc, the
// lazyfs command, the workload) without a shell: fork and exec with the
// signal mask reset, in a process group of their own that the interrupt
// watcher can signal, optionally inside a network namespace and with
// stdout/stderr captured. Also the clock every timing uses.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lazyfs::bench {

// CLOCK_MONOTONIC in nanoseconds: the clock the workload reports in too.
uint64_t monotonic_ns();
inline double seconds_between(uint64_t from_ns, uint64_t to_ns) {
  return static_cast<double>(static_cast<int64_t>(to_ns - from_ns)) / 1e9;
}

struct SpawnOptions {
  int netns_fd = -1;                  // setns(CLONE_NEWNET) before exec
  std::filesystem::path stdout_file;  // empty: /dev/null unless captured
  std::filesystem::path stderr_file;  // empty: /dev/null unless captured
  bool capture_stdout = false;
  bool capture_stderr = false;
  bool new_session = false;      // setsid() rather than only a new process group
  bool die_with_parent = false;  // PR_SET_PDEATHSIG(SIGKILL)
  // Whether the interrupt watcher stops it. Clean-up commands are not
  // interruptible: they must finish after a signal.
  bool interruptible = true;
};
inline SpawnOptions cleanup_command() {
  SpawnOptions o;
  o.interruptible = false;
  return o;
}

struct ProcessResult {
  int status = -1;  // exit code, or 128 + signal
  std::string out;
  std::string err;
  bool ok() const { return status == 0; }
};

// A started child. Destroying it unwaited SIGKILLs its group and reaps it.
class Child {
 public:
  Child() = default;
  Child(Child&& o) noexcept;
  Child& operator=(Child&& o) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child();

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }
  // Reads captured output to its end, then reaps the child.
  ProcessResult wait();
  // Reaps the child if it has exited; true then.
  bool try_wait(ProcessResult& result);
  // Signals the child's process group.
  void signal_group(int sig) const;

 private:
  friend Child spawn(const std::vector<std::string>&, const SpawnOptions&);
  void release();
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int err_fd_ = -1;
  bool tracked_ = false;
};

// Starts argv (argv[0] looked up in PATH unless it has a slash). Throws if
// the program cannot be started.
Child spawn(const std::vector<std::string>& argv, const SpawnOptions& options = {});
// Starts argv with stdout and stderr captured and waits for it.
ProcessResult run(const std::vector<std::string>& argv, SpawnOptions options = {});
// As run(), but throws with the command and its stderr unless it exits 0.
std::string run_checked(const std::vector<std::string>& argv, SpawnOptions options = {});

// Full path of `program` found in PATH, or nothing.
std::optional<std::filesystem::path> find_program(const std::string& program);
std::string command_line(const std::vector<std::string>& argv);

// Whether /proc/<pid> exists and is not a zombie.
bool process_alive(pid_t pid);
// Waits (bounded) for `pid` to exit; reaps it when it is our child.
bool wait_gone(pid_t pid, std::chrono::milliseconds limit);
// Reaps exited children that nobody waits for (the harness is a subreaper,
// so helpers of detached daemons land here), except those in `keep`.
void reap_strays(const std::vector<pid_t>& keep);

}  // namespace lazyfs::bench
