#include "process.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <stdexcept>
#include <thread>
#include <utility>

#include "interrupt.h"

extern char** environ;

namespace lazyfs::bench {
namespace {

int exit_code(int wstatus) {
  if (WIFEXITED(wstatus)) return WEXITSTATUS(wstatus);
  if (WIFSIGNALED(wstatus)) return 128 + WTERMSIG(wstatus);
  return -1;
}

void drain(int& fd, std::string& into) {
  char buf[65536];
  ssize_t n = ::read(fd, buf, sizeof buf);
  if (n > 0) {
    into.append(buf, static_cast<size_t>(n));
  } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
    ::close(fd);
    fd = -1;
  }
}

}  // namespace

uint64_t monotonic_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

std::optional<std::filesystem::path> find_program(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    if (::access(program.c_str(), X_OK) == 0) return std::filesystem::path(program);
    return std::nullopt;
  }
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
  dirs += ":/usr/sbin:/sbin";  // ip, tc and sshd live there; PATH may lack them
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    auto candidate = std::filesystem::path(dirs.substr(start, end - start)) / program;
    if (end > start && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return std::nullopt;
}

std::string command_line(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out += ' ';
    if (a.empty() || a.find_first_of(" \t\"'\\$") != std::string::npos) {
      out += '\'';
      for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
      out += '\'';
    } else {
      out += a;
    }
  }
  return out;
}

Child::Child(Child&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)),
      out_fd_(std::exchange(o.out_fd_, -1)),
      err_fd_(std::exchange(o.err_fd_, -1)),
      tracked_(o.tracked_) {}

Child& Child::operator=(Child&& o) noexcept {
  if (this != &o) {
    release();
    pid_ = std::exchange(o.pid_, -1);
    out_fd_ = std::exchange(o.out_fd_, -1);
    err_fd_ = std::exchange(o.err_fd_, -1);
    tracked_ = o.tracked_;
  }
  return *this;
}

Child::~Child() {
  release();
}

void Child::release() {
  if (out_fd_ >= 0) ::close(out_fd_);
  if (err_fd_ >= 0) ::close(err_fd_);
  out_fd_ = err_fd_ = -1;
  if (pid_ > 0) {
    ::kill(-pid_, SIGKILL);
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    if (tracked_) untrack_process_group(pid_);
    pid_ = -1;
  }
}

void Child::signal_group(int sig) const {
  if (pid_ > 0) ::kill(-pid_, sig);
}

ProcessResult Child::wait() {
  ProcessResult r;
  while (out_fd_ >= 0 || err_fd_ >= 0) {
    pollfd fds[2];
    nfds_t n = 0;
    if (out_fd_ >= 0) fds[n++] = {out_fd_, POLLIN, 0};
    if (err_fd_ >= 0) fds[n++] = {err_fd_, POLLIN, 0};
    if (::poll(fds, n, -1) < 0 && errno != EINTR) break;
    for (nfds_t i = 0; i < n; ++i) {
      if (!fds[i].revents) continue;
      if (fds[i].fd == out_fd_)
        drain(out_fd_, r.out);
      else if (fds[i].fd == err_fd_)
        drain(err_fd_, r.err);
    }
  }
  if (pid_ > 0) {
    int wstatus = 0;
    while (::waitpid(pid_, &wstatus, 0) < 0 && errno == EINTR) {
    }
    r.status = exit_code(wstatus);
    if (tracked_) untrack_process_group(pid_);
    pid_ = -1;
  }
  return r;
}

bool Child::try_wait(ProcessResult& result) {
  if (pid_ <= 0) return true;
  int wstatus = 0;
  if (::waitpid(pid_, &wstatus, WNOHANG) != pid_) return false;
  result.status = exit_code(wstatus);
  if (tracked_) untrack_process_group(pid_);
  pid_ = -1;
  if (out_fd_ >= 0) drain(out_fd_, result.out);
  if (err_fd_ >= 0) drain(err_fd_, result.err);
  return true;
}

Child spawn(const std::vector<std::string>& argv_in, const SpawnOptions& o) {
  if (argv_in.empty()) throw std::runtime_error("spawn: empty command");
  auto program = find_program(argv_in[0]);
  if (!program) throw std::runtime_error(fmt::format("{}: not found in PATH", argv_in[0]));
  // Everything the child needs is prepared before fork: after it, only
  // async-signal-safe calls.
  std::vector<std::string> args = argv_in;
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string exe = program->string();
  const std::string out_path = o.stdout_file.empty() ? "/dev/null" : o.stdout_file.string();
  const std::string err_path = o.stderr_file.empty() ? "/dev/null" : o.stderr_file.string();
  int out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1};
  if ((o.capture_stdout && ::pipe2(out_pipe, O_CLOEXEC) != 0) ||
      (o.capture_stderr && ::pipe2(err_pipe, O_CLOEXEC) != 0)) {
    throw std::runtime_error(fmt::format("pipe: {}", std::strerror(errno)));
  }
  const pid_t parent = ::getpid();
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    if (o.die_with_parent) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
    }
    if (o.new_session) {
      ::setsid();
    } else {
      ::setpgid(0, 0);
    }
    if (o.netns_fd >= 0 && ::setns(o.netns_fd, CLONE_NEWNET) != 0) ::_exit(126);
    int in = ::open("/dev/null", O_RDONLY);
    int out = o.capture_stdout ? out_pipe[1]
                               : ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    int err = o.capture_stderr ? err_pipe[1]
                               : ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (in < 0 || out < 0 || err < 0 || ::dup2(in, 0) < 0 || ::dup2(out, 1) < 0 ||
        ::dup2(err, 2) < 0) {
      ::_exit(126);
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(exe.c_str(), argv.data(), environ);
    ::_exit(127);
  }
  // Also in the parent, so that a signal sent before the child's own
  // setpgid() finds the group.
  if (!o.new_session) ::setpgid(pid, pid);
  Child c;
  c.pid_ = pid;
  c.tracked_ = o.interruptible;
  if (c.tracked_) track_process_group(pid);
  if (o.capture_stdout) {
    ::close(out_pipe[1]);
    c.out_fd_ = out_pipe[0];
  }
  if (o.capture_stderr) {
    ::close(err_pipe[1]);
    c.err_fd_ = err_pipe[0];
  }
  return c;
}

ProcessResult run(const std::vector<std::string>& argv, SpawnOptions options) {
  options.capture_stdout = true;
  options.capture_stderr = true;
  return spawn(argv, options).wait();
}

std::string run_checked(const std::vector<std::string>& argv, SpawnOptions options) {
  auto r = run(argv, std::move(options));
  if (!r.ok()) {
    check_interrupted();
    std::string err = r.err;
    while (!err.empty() && (err.back() == '\n' || err.back() == ' ')) err.pop_back();
    throw std::runtime_error(
        fmt::format("`{}` failed (exit {}): {}", command_line(argv), r.status, err));
  }
  return r.out;
}

bool process_alive(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] != 'Z';
}

bool wait_gone(pid_t pid, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) return true;
    if (!process_alive(pid)) {
      ::waitpid(pid, nullptr, WNOHANG);
      return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void reap_strays(const std::vector<pid_t>& keep) {
  for (;;) {
    siginfo_t info{};
    if (::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid == 0) return;
    for (pid_t k : keep) {
      if (k == info.si_pid) return;  // its owner reaps it
    }
    ::waitpid(info.si_pid, nullptr, WNOHANG);
  }
}

}  // namespace lazyfs::bench
