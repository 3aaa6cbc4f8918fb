// `lazyfs mount [OPTIONS] MOUNTPOINT IMGDIR SOURCE`: serve the checkpoint's
// files at MOUNTPOINT + their original paths, fetching from SOURCE on demand.
// Without --foreground it returns once the mount serves, then runs detached.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <cstring>

#include "commands.h"
#include "lazyfs/image.h"
#include "lazyfs/log.h"
#include "lazyfs/trace.h"
#include "mount.h"

namespace lazyfs::cli {
namespace {

// --fill-alongside auto: the window it tries beside missing readers (the
// size measured best for a many-small restore over 1 Gbit/s: 4-16M alike).
constexpr uint64_t kAutoAlongside = 8 << 20;

struct MountCli {
  MountOptions opts;
  std::string block_size = "128K";
  double timeout_s = 30;
  std::string log_level = "info";
  std::string ssh_client = "openssh";
  std::string fill_rate;
  std::string fill_alongside;
  unsigned trace_seconds = 60;
  std::string prefetch;
  double prefetch_wait_s = 0;
};

bool parse_size(const std::string& text, uint64_t& out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (errno || end == text.c_str()) return false;
  std::string suffix(end);
  uint64_t mult = 1;
  if (suffix == "K" || suffix == "k" || suffix == "KiB")
    mult = 1ull << 10;
  else if (suffix == "M" || suffix == "MiB")
    mult = 1ull << 20;
  else if (suffix == "G" || suffix == "GiB")
    mult = 1ull << 30;
  else if (!suffix.empty())
    return false;
  out = v * mult;
  return v == out / mult;
}

// Opens the log destination of a detached daemon and points stdout/stderr
// at it (stdin at /dev/null).
bool redirect_stdio(const std::filesystem::path& log_file) {
  int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  int log_fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (null_fd < 0 || log_fd < 0) return false;
  ::dup2(null_fd, STDIN_FILENO);
  ::dup2(log_fd, STDOUT_FILENO);
  ::dup2(log_fd, STDERR_FILENO);
  ::close(null_fd);
  ::close(log_fd);
  return true;
}

// Creates the missing directories above `file`, each private (0700): the
// default log file lives in the cache directory, which must be.
bool make_private_parents(const std::filesystem::path& file) {
  std::filesystem::path partial;
  for (const auto& part : file.parent_path()) {
    partial /= part;
    if (::mkdir(partial.c_str(), 0700) != 0 && errno != EEXIST) return false;
  }
  return true;
}

int mount_command(MountCli& cli) {
  auto& o = cli.opts;
  if (!parse_size(cli.block_size, o.block_size) || o.block_size < 4096 ||
      o.block_size > (64u << 20) || (o.block_size & (o.block_size - 1)) != 0) {
    print_error(fmt::format("--block-size {}: need a power of two from 4K to 64M", cli.block_size));
    return kExitBadInput;
  }
  if (auto lvl = log::parse_level(cli.log_level)) {
    log::set_level(*lvl);
  } else {
    print_error(fmt::format("--log-level {}: use debug, info, warn, error or off", cli.log_level));
    return kExitBadInput;
  }
  if (o.connections < 1 || o.connections > 64) {
    print_error("--connections: need 1 to 64");
    return kExitBadInput;
  }
  if (cli.ssh_client == "openssh") {
    o.ssh_client = SshClient::kOpenSsh;
  } else if (cli.ssh_client == "libssh2") {
    o.ssh_client = SshClient::kLibssh2;
  } else {
    print_error(fmt::format("--ssh-client {}: use openssh or libssh2", cli.ssh_client));
    return kExitBadInput;
  }
  if (cli.timeout_s <= 0 || cli.timeout_s > 86400) {
    print_error("--timeout: need a number of seconds above 0");
    return kExitBadInput;
  }
  if (!cli.fill_rate.empty()) {
    if (!parse_size(cli.fill_rate, o.fill_rate) || o.fill_rate == 0) {
      print_error(fmt::format("--fill-rate {}: need bytes per second, e.g. 50M", cli.fill_rate));
      return kExitBadInput;
    }
    o.fill = true;
  }
  if (cli.fill_alongside == "auto") {
    o.fill_alongside = kAutoAlongside;
    o.fill_adapt = true;
    o.fill = true;
  } else if (!cli.fill_alongside.empty()) {
    if (!parse_size(cli.fill_alongside, o.fill_alongside) || o.fill_alongside == 0) {
      print_error(fmt::format("--fill-alongside {}: need a size in bytes, e.g. 4M, or auto",
                              cli.fill_alongside));
      return kExitBadInput;
    }
    o.fill = true;
  }
  if (cli.trace_seconds == 0) {
    print_error("--trace-seconds: need at least 1");
    return kExitBadInput;
  }
  o.trace_seconds = std::chrono::seconds(cli.trace_seconds);
  if (!o.record_trace.empty()) o.record_trace = std::filesystem::absolute(o.record_trace);
  if (!cli.prefetch.empty()) {
    try {
      o.prefetch = read_trace(cli.prefetch);
    } catch (const TraceError& e) {
      print_error(e.what());
      return kExitBadInput;
    }
  }
  if (cli.prefetch_wait_s > 0 && cli.prefetch.empty()) {
    print_error("--prefetch-wait needs --prefetch TRACE");
    return kExitBadInput;
  }
  o.prefetch_wait = std::chrono::milliseconds(static_cast<int64_t>(cli.prefetch_wait_s * 1000));
  o.timeout = std::chrono::milliseconds(static_cast<int64_t>(cli.timeout_s * 1000));
  o.stall_timeout = std::min(o.stall_timeout, o.timeout);
  o.mountpoint = std::filesystem::absolute(o.mountpoint).lexically_normal();
  if (o.cache_dir.empty()) o.cache_dir = default_cache_dir();
  o.cache_dir = std::filesystem::absolute(o.cache_dir);
  if (!o.log_file.empty()) o.log_file = std::filesystem::absolute(o.log_file);

  std::optional<Catalog> catalog;
  try {
    catalog.emplace(Catalog::load(o.image_dir));
  } catch (const std::exception& e) {
    print_error(e.what());
    return kExitBadInput;
  }
  if (auto st = check_mountpoint(o.mountpoint); !st.ok()) {
    print_error(st.message());
    return kExitBadInput;
  }

  if (o.foreground) {
    if (!o.log_file.empty() && !redirect_stdio(o.log_file)) {
      print_error(fmt::format("cannot open log file {}", o.log_file.string()));
      return kExitFailure;
    }
    int failed_status = kExitFailure;
    int rc = run_mount(o, *catalog, [&](const Status& st) {
      if (!st.ok()) {
        print_error(st.message());
        failed_status = st.errnum() == EINVAL ? kExitBadInput : kExitFailure;
      }
    });
    return rc == 0 ? 0 : failed_status;
  }

  // Detach: the child starts everything (threads, connections, the mount)
  // and tells the parent through a pipe when the mount serves, or why not.
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) {
    print_error(fmt::format("pipe: {}", std::strerror(errno)));
    return kExitFailure;
  }
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    print_error(fmt::format("fork: {}", std::strerror(errno)));
    return kExitFailure;
  }
  if (pid > 0) {
    ::close(pipefd[1]);
    std::string msg;
    char buf[512];
    ssize_t n;
    while ((n = ::read(pipefd[0], buf, sizeof buf)) != 0) {
      if (n < 0) {
        if (errno == EINTR) continue;
        break;
      }
      msg.append(buf, static_cast<size_t>(n));
    }
    if (msg == "ok") return kExitOk;
    if (msg.empty()) {
      print_error(
          "the daemon exited during start-up; see " +
          (o.log_file.empty() ? (o.cache_dir / "lazyfs.log").string() : o.log_file.string()));
      return kExitFailure;
    }
    print_error(msg.substr(2));
    return msg[0] == '2' ? kExitBadInput : kExitFailure;
  }
  ::close(pipefd[0]);
  ::setsid();
  int report_fd = pipefd[1];
  auto report_failure = [&](std::string msg) {
    msg = "1 " + msg;
    (void)!::write(report_fd, msg.data(), msg.size());
    ::_exit(kExitFailure);
  };
  // The log file has every line from the start; until the mount serves,
  // warnings and errors also reach the terminal, and then stdout and stderr
  // become the log.
  const auto log_file = o.log_file.empty() ? o.cache_dir / "lazyfs.log" : o.log_file;
  if (!make_private_parents(log_file)) report_failure("cannot open log file " + log_file.string());
  const int log_fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log_fd < 0) report_failure("cannot open log file " + log_file.string());
  // Each line names this daemon: the mounts of one cache directory share
  // its default log file.
  const long daemon_pid = ::getpid();
  log::set_sink(
      [log_fd, daemon_pid](log::Level lvl, std::string_view subsystem, std::string_view message) {
        const auto line = log::format_line(lvl, subsystem, message, daemon_pid);
        (void)!::write(log_fd, line.data(), line.size());
        if (lvl >= log::Level::kWarn) {
          const auto shown = log::format_line(lvl, subsystem, message);
          std::fwrite(shown.data(), 1, shown.size(), stderr);
        }
      });
  auto report = [&](const Status& st) {
    std::string msg =
        st.ok() ? "ok" : fmt::format("{} {}", st.errnum() == EINVAL ? '2' : '1', st.message());
    if (st.ok()) {
      if (!redirect_stdio(log_file)) msg = "1 cannot open log file " + log_file.string();
      // stderr, now the log; no line is being written to log_fd.
      log::set_sink(
          [daemon_pid](log::Level lvl, std::string_view subsystem, std::string_view message) {
            const auto line = log::format_line(lvl, subsystem, message, daemon_pid);
            std::fwrite(line.data(), 1, line.size(), stderr);  // one call keeps lines whole
          });
      ::close(log_fd);
    }
    (void)!::write(report_fd, msg.data(), msg.size());
    ::close(report_fd);
    report_fd = -1;
  };
  int rc = run_mount(o, *catalog, report);
  if (report_fd >= 0) ::close(report_fd);
  ::_exit(rc);
}

}  // namespace

Runner add_mount_command(CLI::App& app) {
  auto cli = std::make_shared<MountCli>();
  auto* cmd = app.add_subcommand(
      "mount", "Mount the checkpoint's files at MOUNTPOINT, fetched lazily from SOURCE");
  auto& o = cli->opts;
  cmd->add_option("MOUNTPOINT", o.mountpoint, "Where to mount (an existing empty directory)")
      ->required();
  cmd->add_option("IMGDIR", o.image_dir, "CRIU image directory (criu dump -D)")->required();
  cmd->add_option("SOURCE", o.source,
                  "Where the files are: [USER@]HOST, sftp://[USER@]HOST[:PORT][/ROOT], "
                  "http(s)://HOST[:PORT][/ROOT] (ranged GETs) or file:///DIR (file P is read at "
                  "ROOT + P)")
      ->required();
  cmd->add_option(
      "--cache-dir", o.cache_dir,
      "Cache directory (default $LAZYFS_CACHE_DIR, else /var/cache/lazyfs for root, else "
      "~/.cache/lazyfs)");
  cmd->add_option("--block-size", cli->block_size, "Fetch unit, a power of two (default 128K)");
  cmd->add_option(
      "--connections", o.connections,
      "Connections to the source: SSH sessions or HTTP keep-alive connections (default 4)");
  cmd->add_option("--identity", o.identity_files, "SSH private key file (repeatable)");
  cmd->add_option("--known-hosts", o.known_hosts,
                  "known_hosts file to check the host key against (default ~/.ssh/known_hosts)");
  cmd->add_option("--ca-file", o.ca_file,
                  "https: trust the certificate authorities in this PEM file instead of the "
                  "system's")
      ->check(CLI::ExistingFile);
  cmd->add_flag("--accept-new-host-key", o.accept_new_host_key,
                "Add an unknown host's key to known_hosts (a changed key is still refused)");
  cmd->add_flag("--insecure-no-host-key-check", o.insecure_no_host_key_check,
                "Do not check the host key at all (exposes you to man-in-the-middle attacks)");
  cmd->add_option("--ssh-client", cli->ssh_client,
                  "openssh (the default): run OpenSSH's ssh for each session, which honours "
                  "~/.ssh/config; libssh2: speak SSH inside the daemon")
      ->option_text("openssh|libssh2");
  cmd->add_option("--ssh-command", o.ssh_command,
                  "The OpenSSH client program to run (default ssh, looked up in PATH)");
  cmd->add_option("--ssh-option", o.ssh_options,
                  "Pass ssh this -o option (NAME=VALUE), ahead of lazyfs's own so that it wins "
                  "(repeatable)");
  cmd->add_option("--timeout", cli->timeout_s,
                  "Seconds a read may spend retrying before it fails with EIO (default 30)");
  cmd->add_flag("-f,--foreground", o.foreground, "Stay in the foreground and log to stderr");
  cmd->add_flag("--read-only", o.read_only, "Refuse every change with EROFS");
  cmd->add_flag("--compat-names", o.compat_names,
                "Also show each file at the root under its LazyFS flat name (a/b/c as a.b.c)");
  cmd->add_option("--log-level", cli->log_level, "debug, info, warn, error or off (default info)");
  cmd->add_option("--log-file", o.log_file,
                  "Log here (default: stderr in the foreground, CACHE_DIR/lazyfs.log detached)");
  cmd->add_flag("--fill", o.fill,
                "Fetch every remaining byte in the background, behind readers, until the "
                "source is no longer needed (see `lazyfs status --wait`)");
  cmd->add_option("--fill-rate", cli->fill_rate,
                  "Cap the fill's bandwidth, bytes per second (e.g. 50M); implies --fill");
  cmd->add_option("--fill-alongside", cli->fill_alongside,
                  "Let the fill keep this many bytes in flight while readers are missing "
                  "(e.g. 4M) instead of pausing for them: the source is released sooner where "
                  "the restore leaves CPU and link idle, at a cost to it elsewhere; auto: 8M "
                  "only while that serves the readers at least 10% faster than pausing, as "
                  "measured by trying both in turn (no trials where the source answers "
                  "within 2 ms: it pauses); implies --fill");
  cmd->add_option("--record-trace", o.record_trace,
                  "Write which blocks were read in the first --trace-seconds to this file");
  cmd->add_option("--trace-seconds", cli->trace_seconds, "How long to record (default 60)");
  cmd->add_option("--prefetch", cli->prefetch,
                  "Fetch the blocks a recorded trace names right after mounting, ahead of "
                  "everything but reads");
  cmd->add_option("--prefetch-wait", cli->prefetch_wait_s,
                  "Return only once the trace's blocks are local, or after this many seconds, "
                  "so that the restore started next finds them present (default 0: at once)")
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_option("-o", o.fuse_options, "FUSE mount option (repeatable)")->allow_extra_args(false);
  return [cli]() { return mount_command(*cli); };
}

}  // namespace lazyfs::cli
