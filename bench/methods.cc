#include "methods.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "delay_relay.h"
#include "interrupt.h"
#include "lazyfs/filesystem.h"
#include "process.h"
#include "ssh_server.h"

namespace lazyfs::bench {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::vector<std::string> mounts_at_or_below(const fs::path& dir) {
  std::ifstream in("/proc/self/mounts");
  std::vector<std::string> out;
  std::string line;
  const std::string prefix = dir.string();
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string dev, mp;
    fields >> dev >> mp;
    if (mp == prefix || mp.rfind(prefix + "/", 0) == 0) out.push_back(mp);
  }
  return out;
}

bool is_mounted(const fs::path& dir) {
  for (const auto& m : mounts_at_or_below(dir)) {
    if (m == dir.string()) return true;
  }
  return false;
}

void fresh_dir(const fs::path& dir) {
  remove_tree(dir);
  fs::create_directories(dir);
}

std::string ssh_target(const BenchContext& ctx, const fs::path& remote) {
  (void)ctx;
  return "root@127.0.0.1:" + remote.string();
}

// Runs a copy or mount helper to its end; throws with its stderr if it fails.
void run_step(const std::vector<std::string>& argv, const BenchContext& ctx) {
  if (ctx.verbose) fmt::print(stderr, "+ {}\n", command_line(argv));
  run_checked(argv);
}

// --- eager copies -------------------------------------------------------

void eager_copy(const std::string& method, const Scenario& s, const fs::path& dest_root,
                const BenchContext& ctx) {
  const auto& opts = ctx.ssh->client_options();
  const auto port = std::to_string(ctx.relay->port());
  const fs::path remote = ctx.source_root.string() + s.dir();
  const fs::path dest_parent = fs::path(dest_root.string() + s.dir()).parent_path();
  fs::create_directories(dest_parent);
  std::vector<std::string> argv;
  if (method == "eager-scp") {
    argv = {"scp", "-O", "-r", "-q", "-p", "-P", port};
    argv.insert(argv.end(), opts.begin(), opts.end());
    argv.push_back(ssh_target(ctx, remote));
    argv.push_back(dest_parent.string() + "/");
  } else if (method == "eager-sftp") {
    const auto batch = ctx.scratch / "run" / "sftp-batch";
    std::ofstream(batch, std::ios::trunc)
        << fmt::format("get -r -p {} {}\n", remote.string(), dest_parent.string() + "/");
    argv = {"sftp", "-q", "-b", batch.string(), "-P", port};
    argv.insert(argv.end(), opts.begin(), opts.end());
    argv.push_back("root@127.0.0.1");
  } else if (method == "eager-rsync") {
    std::string ssh = "ssh -p " + port;
    for (const auto& o : opts) ssh += " " + o;
    argv = {"rsync", "-a", "-e", ssh, ssh_target(ctx, remote), dest_parent.string() + "/"};
  } else {
    throw std::logic_error("not an eager method: " + method);
  }
  run_step(argv, ctx);
}

// Makes everything written to the file system holding `dir` durable.
// A run's directory, empty. With a fresh ext4 it is a file system of its
// own, so that every run starts like a fresh restore host's disk. On one
// shared file system a run would inherit the inodes the runs before it
// deleted, and ext4 without a journal (the root file system of some cloud
// images, this project's build machines among them) scans the inodes deleted
// in the last minutes on every create: by hand, a many-file fill took up to
// 3x longer right after other runs. The image file itself is kept from run
// to run (each run's mkfs makes a new file system in it): deleting the
// gigabytes a run wrote made the start of the next run up to 0.35 s slower
// here, whatever its method.
void make_run_dir(const fs::path& run_dir, const BenchContext& ctx) {
  remove_tree(run_dir);
  fs::create_directories(run_dir);
  if (!ctx.restore_fs.fresh_ext4) return;
  const fs::path image = run_dir.string() + ".img";
  std::error_code ec;
  if (fs::file_size(image, ec) != ctx.restore_fs.bytes) {
    { std::ofstream(image, std::ios::trunc); }
    fs::resize_file(image, ctx.restore_fs.bytes);
  }
  run_step({"mkfs.ext4", "-q", "-F", "-N", std::to_string(ctx.restore_fs.inodes), "-E", "nodiscard",
            image.string()},
           ctx);
  // noinit_itable: no zeroing of inode tables in the background, mid-run.
  run_step({"mount", "-o", "loop,noinit_itable", image.string(), run_dir.string()}, ctx);
}

void sync_file_system(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const int rc = fd < 0 ? -1 : ::syncfs(fd);
  const int err = errno;
  if (fd >= 0) ::close(fd);
  if (rc != 0) {
    throw std::runtime_error(fmt::format("cannot sync {}: {}", dir.string(), std::strerror(err)));
  }
}

// --- sshfs --------------------------------------------------------------

class SshfsMount {
 public:
  SshfsMount(const fs::path& mountpoint, const fs::path& remote, const BenchContext& ctx)
      : mountpoint_(mountpoint) {
    const auto& opts = ctx.ssh->client_options();
    std::vector<std::string> argv{"sshfs",
                                  "root@127.0.0.1:" + remote.string(),
                                  mountpoint.string(),
                                  "-f",
                                  "-p",
                                  std::to_string(ctx.relay->port()),
                                  "-o",
                                  "ro"};
    // sshfs takes ssh's -F itself and passes -o KEY=VALUE ssh options on.
    argv.insert(argv.end(), opts.begin(), opts.end());
    if (ctx.verbose) fmt::print(stderr, "+ {}\n", command_line(argv));
    SpawnOptions so;
    so.capture_stderr = true;
    child_ = spawn(argv, so);
    cleanup_id_ = CleanupStack::push("sshfs mount " + mountpoint.string(), [this] { stop(); });
    try {
      const auto deadline = std::chrono::steady_clock::now() + 60s;
      while (!is_mounted(mountpoint_)) {
        check_interrupted();
        ProcessResult r;
        if (child_.try_wait(r)) {
          throw std::runtime_error(fmt::format("sshfs exited ({}): {}", r.status, r.err));
        }
        if (std::chrono::steady_clock::now() > deadline) {
          throw std::runtime_error("sshfs: no mount");
        }
        std::this_thread::sleep_for(1ms);
      }
    } catch (...) {
      CleanupStack::run(cleanup_id_);  // the destructor will not run
      throw;
    }
  }
  ~SshfsMount() { CleanupStack::run(cleanup_id_); }

 private:
  void stop() {
    if (::umount2(mountpoint_.c_str(), 0) != 0) ::umount2(mountpoint_.c_str(), MNT_DETACH);
    if (child_.running()) {
      const auto deadline = std::chrono::steady_clock::now() + 10s;
      ProcessResult r;
      while (!child_.try_wait(r) && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(5ms);
      }
      child_ = Child();  // kills it if it is still there
    }
  }

  fs::path mountpoint_;
  Child child_;
  int cleanup_id_ = 0;
};

// --- lazyfs -------------------------------------------------------------

struct ProcUsage {
  double cpu_s = 0;
  uint64_t peak_rss_kib = 0;
};

ProcUsage read_usage(pid_t pid) {
  ProcUsage u;
  std::ifstream stat_in(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(stat_in)), std::istreambuf_iterator<char>());
  const auto paren = stat.rfind(')');
  if (paren != std::string::npos) {
    std::istringstream fields(stat.substr(paren + 2));
    std::vector<std::string> f;
    std::string word;
    while (fields >> word) f.push_back(word);
    // Fields from the state (3rd): utime is the 14th, stime the 15th.
    if (f.size() > 12) {
      const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
      u.cpu_s = static_cast<double>(std::stoull(f[11]) + std::stoull(f[12])) / ticks;
    }
  }
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) u.peak_rss_kib = std::stoull(line.substr(6));
  }
  return u;
}

class LazyfsMount {
 public:
  // `extra`: further `lazyfs mount` options (--fill, --record-trace, --prefetch).
  LazyfsMount(const fs::path& mountpoint, const fs::path& image_dir, const fs::path& cache_dir,
              const fs::path& remote_root, const BenchContext& ctx,
              const std::vector<std::string>& extra = {})
      : ctx_(ctx), mountpoint_(mountpoint) {
    std::vector<std::string> argv{
        (ctx.bin_dir / "lazyfs").string(),
        "mount",
        "--cache-dir",
        cache_dir.string(),
        "--identity",
        ctx.ssh->user_key().string(),
        "--known-hosts",
        ctx.ssh->known_hosts().string(),
        mountpoint.string(),
        image_dir.string(),
        fmt::format("sftp://root@127.0.0.1:{}{}", ctx.relay->port(), remote_root.string())};
    argv.insert(argv.begin() + 2, extra.begin(), extra.end());
    argv.insert(argv.begin() + 2, ctx.lazyfs_options.begin(), ctx.lazyfs_options.end());
    if (ctx.verbose) fmt::print(stderr, "+ {}\n", command_line(argv));
    cleanup_id_ = CleanupStack::push("lazyfs mount " + mountpoint.string(), [this] { stop(); });
    try {
      run_checked(argv);
    } catch (...) {
      CleanupStack::run(cleanup_id_);  // the destructor will not run
      throw;
    }
  }
  ~LazyfsMount() { CleanupStack::run(cleanup_id_); }

  nlohmann::json status(SpawnOptions how = {}) const {
    auto out = run_checked(
        {(ctx_.bin_dir / "lazyfs").string(), "status", "--json", mountpoint_.string()}, how);
    return nlohmann::json::parse(out);
  }
  // The daemon's pid, once asked.
  pid_t pid(SpawnOptions how = {}) {
    if (pid_ <= 0) pid_ = status(how)["pid"].get<pid_t>();
    return pid_;
  }

 private:
  void stop() {
    if (pid_ <= 0 && is_mounted(mountpoint_)) {
      try {
        pid(cleanup_command());
      } catch (...) {
      }
    }
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      if (!wait_gone(pid_, 20s)) {
        ::kill(pid_, SIGKILL);
        wait_gone(pid_, 5s);
      }
      pid_ = -1;
    }
    if (is_mounted(mountpoint_)) ::umount2(mountpoint_.c_str(), MNT_DETACH);
  }

  const BenchContext& ctx_;
  fs::path mountpoint_;
  pid_t pid_ = -1;
  int cleanup_id_ = 0;
};

// Polls the mount's status socket on its own thread, every 20 ms from
// construction until the mount says every served file is local ("complete":
// true), and keeps the time it first did. Polled in this process
// (lazyfs::query_status, what `lazyfs status --json --no-files` asks for),
// which costs the daemon about 0.5 ms with 5,000 files. Before v15 each poll
// was a `lazyfs status` process, every 50 ms, at some 19 ms of CPU (mostly
// loading its libraries): a quarter of one of this VM's 2 cores while the
// fill it timed ran.
class CompletionWatch {
 public:
  explicit CompletionWatch(fs::path mountpoint) : mountpoint_(std::move(mountpoint)) {
    thread_ = std::thread([this] { loop(); });
  }
  ~CompletionWatch() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  CompletionWatch(const CompletionWatch&) = delete;
  CompletionWatch& operator=(const CompletionWatch&) = delete;

  // CLOCK_MONOTONIC ns when the mount was first seen complete. Throws if the
  // fill failed, the status stopped answering, `limit` passed or a signal
  // came.
  uint64_t wait(std::chrono::seconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    std::unique_lock lock(mutex_);
    while (complete_ns_ == 0 && error_.empty()) {
      lock.unlock();
      check_interrupted();
      lock.lock();
      if (std::chrono::steady_clock::now() > deadline) {
        throw std::runtime_error(
            fmt::format("the fill did not complete within {} s", limit.count()));
      }
      cv_.wait_for(lock, 20ms, [&] { return complete_ns_ != 0 || !error_.empty(); });
    }
    if (!error_.empty()) throw std::runtime_error(error_);
    return complete_ns_;
  }

 private:
  void loop() {
    unsigned failures = 0;
    std::unique_lock lock(mutex_);
    while (!stop_ && !interrupted()) {
      lock.unlock();
      std::string error;
      bool complete = false;
      std::string doc;
      const auto st = lazyfs::query_status(mountpoint_, doc, /*with_files=*/false);
      const uint64_t now = monotonic_ns();
      if (st.ok()) {
        try {
          const auto j = nlohmann::json::parse(doc);
          complete = j.at("complete").get<bool>();
          const auto& fill = j.at("fill");
          if (!complete && fill.value("state", std::string()) == "failed") {
            error = "lazyfs fill failed: " + fill.value("error", std::string("unknown error"));
          }
          failures = 0;
        } catch (const std::exception& e) {
          error = fmt::format("unreadable lazyfs status: {}", e.what());
        }
      } else if (++failures >= 50) {  // a second of polls
        error = fmt::format("lazyfs status of {}: {}", mountpoint_.string(), st.message());
      }
      lock.lock();
      if (complete || !error.empty()) {
        if (complete) complete_ns_ = now;
        error_ = error;
        cv_.notify_all();
        return;
      }
      cv_.wait_for(lock, 20ms, [&] { return stop_; });
    }
  }

  const fs::path mountpoint_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;         // guarded by mutex_
  uint64_t complete_ns_ = 0;  // guarded by mutex_
  std::string error_;         // guarded by mutex_
  std::thread thread_;        // last: started when the rest is ready
};

// --- the restored process -----------------------------------------------

struct ReadResult {
  uint64_t first_byte_ns = 0;
  uint64_t done_ns = 0;
  uint64_t bytes = 0;
  uint64_t sum = 0;
};

ReadResult parse_result(const std::string& text, const Scenario& s) {
  const auto j = nlohmann::json::parse(text);
  ReadResult r{j["first_byte_ns"].get<uint64_t>(), j["done_ns"].get<uint64_t>(),
               j["bytes"].get<uint64_t>(), j["sum"].get<uint64_t>()};
  if (r.bytes != s.bytes_read || r.sum != s.expected_sum) {
    throw std::runtime_error(fmt::format(
        "{}: the workload read {} bytes with sum {}, expected {} bytes with sum {}: wrong data",
        s.name, r.bytes, r.sum, s.bytes_read, s.expected_sum));
  }
  return r;
}

ReadResult run_workload(const PreparedScenario& p, const fs::path& root, const BenchContext& ctx) {
  const std::vector<std::string> argv{(ctx.bin_dir / "lazyfs-bench-workload").string(), "--plan",
                                      p.plan_file.string(), "--root", root.string()};
  if (ctx.verbose) fmt::print(stderr, "+ {}\n", command_line(argv));
  return parse_result(run_checked(argv), *p.scenario);
}

ReadResult criu_restore(const PreparedScenario& p, const fs::path& image_dir,
                        const BenchContext& ctx) {
  const auto result = p.criu_dir / "result.json";
  const auto pidfile = p.criu_dir / "restored.pid";
  std::error_code ec;
  fs::remove(result, ec);
  fs::remove(pidfile, ec);
  std::ofstream(p.criu_dir / "go") << "go\n";
  const std::vector<std::string> argv{p.criu->string(),
                                      "restore",
                                      "-D",
                                      image_dir.string(),
                                      "--restore-detached",
                                      "--pidfile",
                                      pidfile.string(),
                                      "-o",
                                      (p.criu_dir / "restore.log").string(),
                                      "-v4"};
  if (ctx.verbose) fmt::print(stderr, "+ {}\n", command_line(argv));
  auto r = run(argv);
  if (!r.ok()) {
    check_interrupted();
    throw std::runtime_error(fmt::format("criu restore failed ({}); see {}", r.status,
                                         (p.criu_dir / "restore.log").string()));
  }
  pid_t pid = -1;
  std::ifstream(pidfile) >> pid;
  const auto deadline = std::chrono::steady_clock::now() + 30min;
  while (!fs::exists(result)) {
    check_interrupted();
    if (pid > 0 && !process_alive(pid) && !fs::exists(result)) {
      throw std::runtime_error("the restored workload exited without a result");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("the restored workload did not finish");
    }
    std::this_thread::sleep_for(1ms);
  }
  if (pid > 0) wait_gone(pid, 30s);
  std::ifstream in(result);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_result(ss.str(), *p.scenario);
}

void prepare_images(const fs::path& image_dir, const fs::path& mnt, const BenchContext& ctx) {
  run_step({(ctx.bin_dir / "lazyfs").string(), "prepare", image_dir.string(), "--mountpoint",
            mnt.string(), "--all"},
           ctx);
}

// lazyfs+prefetch's untimed first migration: a cold mount with
// --record-trace, the same restore (workload or criu restore), then the
// daemon is stopped, which writes the trace. Leaves nothing but `trace`.
void record_trace(const PreparedScenario& p, const fs::path& trace, const fs::path& remote_root,
                  const BenchContext& ctx) {
  const fs::path dir = ctx.scratch / "run" / "record";
  fresh_dir(dir);
  const fs::path images = dir / "img", mnt = dir / "mnt";
  fs::copy(p.checkpoint, images, fs::copy_options::recursive);
  fs::create_directories(mnt);
  drop_caches();
  {
    // Far longer than any restore here: the trace ends when the daemon does.
    LazyfsMount m(mnt, images, dir / "cache", remote_root, ctx,
                  {"--record-trace", trace.string(), "--trace-seconds", "86400"});
    prepare_images(images, mnt, ctx);
    if (p.criu) {
      criu_restore(p, images, ctx);
    } else {
      run_workload(p, mnt, ctx);
    }
  }  // SIGTERM: the daemon writes the trace as it unmounts
  if (!fs::exists(trace)) {
    throw std::runtime_error("the recording mount left no trace at " + trace.string());
  }
  remove_tree(dir);
}

void wait_relay_idle(const BenchContext& ctx) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (ctx.relay->open_connections() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(2ms);
  }
}

}  // namespace

const std::vector<std::string>& method_names() {
  static const std::vector<std::string> names{
      "eager-scp",   "eager-sftp",       "eager-rsync",       "sshfs",          "lazyfs",
      "lazyfs+fill", "lazyfs+fill-auto", "lazyfs+fill-first", "lazyfs+prefetch"};
  return names;
}

void drop_caches() {
  ::sync();
  int fd = ::open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  (void)!::write(fd, "3\n", 2);
  ::close(fd);
}

void remove_tree(const fs::path& dir) {
  auto mounts = mounts_at_or_below(dir);
  // Deepest first.
  std::sort(mounts.begin(), mounts.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  for (const auto& m : mounts) ::umount2(m.c_str(), MNT_DETACH);
  if (!mounts_at_or_below(dir).empty()) {
    throw std::runtime_error("cannot remove " + dir.string() + ": a mount is still below it");
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (ec) throw std::runtime_error("cannot remove " + dir.string() + ": " + ec.message());
}

Sample run_method(const std::string& method, const PreparedScenario& p, const BenchContext& ctx) {
  const Scenario& s = *p.scenario;
  const bool criu = p.criu.has_value();
  const fs::path run_dir = ctx.scratch / "run";
  make_run_dir(run_dir, ctx);
  const fs::path image_copy = run_dir / "img";
  fs::copy(p.checkpoint, image_copy, fs::copy_options::recursive);
  const fs::path mnt = run_dir / "mnt";
  const fs::path dest = criu ? p.files_root : run_dir / "dest";
  fs::create_directories(mnt);
  fs::create_directories(dest);
  if (criu) {
    // The restore host starts without the files.
    remove_tree(dest / "bench");
  }
  const bool lazy = method == "lazyfs" || method.rfind("lazyfs+", 0) == 0;
  const fs::path remote_root = criu ? p.lazyfs_remote_root : ctx.source_root;
  const fs::path trace = run_dir / "restore.trace";
  if (method == "lazyfs+prefetch") record_trace(p, trace, remote_root, ctx);
  wait_relay_idle(ctx);
  drop_caches();
  ctx.relay->reset_counters();
  check_interrupted();

  Sample sample;
  ReadResult rr;
  const uint64_t t0 = monotonic_ns();
  uint64_t t_setup = 0;
  uint64_t not_waited_ns = 0;  // a step the restore would not have waited for
  if (method.rfind("eager-", 0) == 0) {
    eager_copy(method, s, dest, ctx);
    t_setup = monotonic_ns();
    // Until the copy is on disk the source is still needed, as it is until
    // lazyfs's fill has made its cache durable: wholly local is measured to
    // the end of a syncfs. The restore need not wait for it.
    sync_file_system(dest);
    const uint64_t t_durable = monotonic_ns();
    sample.wholly_local_s = seconds_between(t0, t_durable);
    not_waited_ns = t_durable - t_setup;
    rr = criu ? criu_restore(p, image_copy, ctx) : run_workload(p, dest, ctx);
  } else if (method == "sshfs") {
    const fs::path at = criu ? dest : mnt;
    SshfsMount m(at, ctx.source_root, ctx);
    t_setup = monotonic_ns();
    rr = criu ? criu_restore(p, image_copy, ctx) : run_workload(p, at, ctx);
  } else if (lazy) {
    std::vector<std::string> extra;
    const bool fill = method == "lazyfs+fill" || method == "lazyfs+fill-auto";
    const bool fill_first = method == "lazyfs+fill-first";
    if (method == "lazyfs+fill" || fill_first) extra = {"--fill"};
    if (method == "lazyfs+fill-auto") extra = {"--fill-alongside", "auto"};
    if (method == "lazyfs+prefetch") {
      extra = {"--prefetch", trace.string(), "--prefetch-wait", "10"};
    }
    if (method != "lazyfs" && extra.empty())
      throw std::invalid_argument("unknown method " + method);
    LazyfsMount m(mnt, image_copy, run_dir / "cache", remote_root, ctx, extra);
    prepare_images(image_copy, mnt, ctx);
    if (fill_first) {
      // lazyfs as an eager copier: the restore starts once every byte is
      // local, which times the fill alone against the eager copies.
      CompletionWatch watch(mnt);
      sample.wholly_local_s = seconds_between(t0, watch.wait(std::chrono::hours(2)));
    }
    t_setup = monotonic_ns();
    // Without CRIU the workload opens what prepare pointed the checkpoint
    // at: MOUNTPOINT + path.
    rr = criu ? criu_restore(p, image_copy, ctx) : run_workload(p, mnt, ctx);
    const pid_t pid = m.pid();
    auto st = m.status();
    sample.demand_misses = st.value("demand_misses", uint64_t{0});
    if (method == "lazyfs+prefetch") {
      const auto& pf = st.at("prefetch");
      if (pf.value("records", uint64_t{0}) == 0 || pf.value("skipped", uint64_t{0}) != 0) {
        throw std::runtime_error("the recorded trace did not match the checkpoint: prefetch " +
                                 pf.dump());
      }
    }
    if (fill) {
      // Polled from the end of the restore, so that the polling (a process
      // and a status of every file each time) does not slow the restore
      // down; a fill that ended during the restore is reported at its end
      // (an upper bound).
      CompletionWatch watch(mnt);
      sample.wholly_local_s = seconds_between(t0, watch.wait(std::chrono::hours(2)));
      st = m.status();
    }
    const auto usage = read_usage(pid);
    sample.lazyfs_cpu_s = usage.cpu_s;
    sample.lazyfs_peak_rss_kib = usage.peak_rss_kib;
    sample.lazyfs_fetched_bytes = st.value("fetched_bytes", uint64_t{0});
  } else {
    throw std::invalid_argument("unknown method " + method);
  }
  wait_relay_idle(ctx);
  const auto c = ctx.relay->counters();
  sample.ready_s = seconds_between(t0, rr.done_ns - not_waited_ns);
  sample.first_byte_s = seconds_between(t0, rr.first_byte_ns - not_waited_ns);
  sample.setup_s = seconds_between(t0, t_setup);
  sample.to_server = c.to_server;
  sample.to_client = c.to_client;
  sample.bytes_read = rr.bytes;
  if (criu) remove_tree(dest / "bench");
  remove_tree(run_dir);
  return sample;
}

}  // namespace lazyfs::bench
