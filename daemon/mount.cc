#include "mount.h"

#include <pwd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <unordered_map>

#include "control.h"
#include "fuse_fs.h"
#include "lazyfs/fill.h"
#include "lazyfs/http_source.h"
#include "lazyfs/log.h"

namespace lazyfs::cli {

std::filesystem::path default_cache_dir() {
  if (const char* env = std::getenv("LAZYFS_CACHE_DIR"); env && *env) return env;
  if (::geteuid() == 0) return "/var/cache/lazyfs";
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    return std::filesystem::path(xdg) / "lazyfs";
  }
  const char* home = std::getenv("HOME");
  if (!home || !*home) {
    if (const passwd* pw = ::getpwuid(::geteuid())) home = pw->pw_dir;
  }
  return std::filesystem::path(home ? home : "/tmp") / ".cache" / "lazyfs";
}

std::unique_ptr<Source> make_source(const std::string& uri, const MountOptions& options,
                                    Status& status) {
  if (uri.rfind("file://", 0) == 0) return make_local_source(uri.substr(7), status);
  if (uri.rfind("http://", 0) == 0 || uri.rfind("https://", 0) == 0) {
    HttpOptions http;
    http.base_url = uri;
    http.connections = options.connections;
    http.stall_timeout = options.stall_timeout;
    return make_http_source(http, status);
  }
  SftpOptions sftp;
  std::string error;
  if (!parse_sftp_uri(uri, sftp, error)) {
    status = Status::permanent(EINVAL, fmt::format("source {}: {}", uri, error));
    return nullptr;
  }
  sftp.connections = options.connections;
  sftp.identity_files = options.identity_files;
  sftp.known_hosts = options.known_hosts;
  sftp.host_key_policy = options.insecure_no_host_key_check ? HostKeyPolicy::kInsecure
                         : options.accept_new_host_key      ? HostKeyPolicy::kAcceptNew
                                                            : HostKeyPolicy::kStrict;
  sftp.stall_timeout = options.stall_timeout;
  return make_sftp_source(sftp, status);
}

bool is_mount_point(const std::filesystem::path& path) {
  std::ifstream in("/proc/self/mountinfo");
  const auto want = std::filesystem::absolute(path).lexically_normal().string();
  std::string line;
  while (std::getline(in, line)) {
    // Fields: id parent major:minor root mountpoint ...; spaces in paths are \040.
    size_t pos = 0;
    for (int i = 0; i < 4 && pos != std::string::npos; ++i) pos = line.find(' ', pos + 1);
    if (pos == std::string::npos) continue;
    auto end = line.find(' ', pos + 1);
    std::string mp = line.substr(pos + 1, end - pos - 1);
    std::string decoded;
    for (size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        decoded += static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8));
        i += 3;
      } else {
        decoded += mp[i];
      }
    }
    if (decoded == want) return true;
  }
  return false;
}

Status check_mountpoint(const std::filesystem::path& mountpoint) {
  struct stat st;
  if (::stat(mountpoint.c_str(), &st) != 0) {
    if (errno == ENOTCONN || errno == ECONNABORTED) {
      // A FUSE mount whose daemon died: detach it and mount over a clean dir.
      log::warn("mount", "replacing a stale lazyfs mount at {} left by a daemon that exited",
                mountpoint.string());
      fmt::print(stderr, "lazyfs: replacing a stale mount at {}\n", mountpoint.string());
      if (::umount2(mountpoint.c_str(), MNT_DETACH) != 0) {
        std::string cmd = "fusermount3 -u -z -- '" + mountpoint.string() + "' 2>/dev/null";
        if (std::system(cmd.c_str()) != 0) {
          return Status::permanent(EBUSY, fmt::format("mount point {} holds a stale mount that "
                                                      "cannot be detached",
                                                      mountpoint.string()));
        }
      }
      if (::stat(mountpoint.c_str(), &st) != 0) {
        return Status::permanent(
            errno, fmt::format("mount point {}: {}", mountpoint.string(), std::strerror(errno)));
      }
    } else {
      return Status::permanent(
          errno, fmt::format("mount point {}: {}", mountpoint.string(), std::strerror(errno)));
    }
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::permanent(ENOTDIR,
                             fmt::format("mount point {} is not a directory", mountpoint.string()));
  }
  if (is_mount_point(mountpoint)) {
    return Status::permanent(EBUSY, fmt::format("mount point {} is busy: something is already "
                                                "mounted there",
                                                mountpoint.string()));
  }
  return {};
}

namespace {

nlohmann::json fill_json(BackgroundFill* fill) {
  if (!fill) return {{"enabled", false}};
  const auto p = fill->progress();
  nlohmann::json j{{"enabled", true},
                   {"state", fill_state_name(p.state)},
                   {"rate_bytes_s", p.rate},
                   {"requested_bytes", p.requested}};
  if (!p.error.empty()) j["error"] = p.error;
  return j;
}

// What a mount runs beside serving reads, for the status document.
struct Extras {
  BackgroundFill* fill = nullptr;
  TraceRecorder* trace = nullptr;
  size_t prefetch_records = 0;
  size_t prefetch_skipped = 0;
};

std::string render_status(const MountOptions& options, const Catalog& catalog, FetchEngine& engine,
                          fs::LazyFs& lfs, const Extras& extras) {
  const auto es = engine.stats();
  auto files = nlohmann::json::array();
  uint64_t total = 0, fetched = 0, present = 0, local = 0;
  bool complete = true;
  for (const auto& f : engine.file_stats()) {
    const uint64_t size = f.size.value_or(0);
    total += size;
    fetched += f.fetched_bytes;
    present += std::min(f.present_bytes, size);
    local += f.local_bytes;
    complete = complete && f.size && f.present_bytes >= size;
    files.push_back({{"path", f.path},
                     {"size", f.size ? nlohmann::json(size) : nlohmann::json(nullptr)},
                     {"fetched_bytes", f.fetched_bytes},
                     {"present_bytes", f.present_bytes},
                     {"local_bytes", f.local_bytes},
                     {"stale", f.stale}});
  }
  auto ops = nlohmann::json::object();
  for (size_t i = 0; i < lfs.counters().size(); ++i) {
    const auto& c = lfs.counters()[i];
    ops[fs::op_name(static_cast<fs::Op>(i))] = {
        {"calls", c.calls.load()}, {"errors", c.errors.load()}, {"parked", c.parked.load()}};
  }
  const auto& sc = engine.source().counters();
  nlohmann::json j{
      {"mountpoint", options.mountpoint.string()},
      {"checkpoint", catalog.identity()},
      {"pid", ::getpid()},
      {"source",
       {{"uri", engine.source().describe()},
        {"state", source_state_name(engine.source_state())},
        {"connects", sc.connects.load()},
        {"connect_failures", sc.connect_failures.load()}}},
      {"block_size", engine.options().block_size},
      {"total_bytes", total},
      {"fetched_bytes", fetched},
      {"present_bytes", present},
      {"local_bytes", local},
      {"complete", complete},
      {"bytes_served", lfs.bytes_served().load()},
      {"requests", es.requests},
      {"cache_hits", es.cache_hits},
      {"fetch_requests", es.fetch_requests},
      {"inflight", es.inflight},
      {"parked_replies", lfs.replies().parked()},
      {"retries", es.retries},
      {"errors", es.errors},
      {"latency",
       {{"count", es.latency_count},
        {"mean_s",
         es.latency_count ? es.latency_sum_s / static_cast<double>(es.latency_count) : 0.0},
        {"max_s", es.latency_max_s},
        {"ms_log2_buckets", es.latency_ms_log2}}},
      {"ops", ops},
      {"demand_misses", es.demand_misses},
      {"fill", fill_json(extras.fill)},
      {"prefetch", {{"records", extras.prefetch_records}, {"skipped", extras.prefetch_skipped}}},
      {"trace", extras.trace ? nlohmann::json{{"file", options.record_trace.string()},
                                              {"records", extras.trace->records()}}
                             : nlohmann::json(nullptr)},
      {"files", files}};
  return j.dump();
}

}  // namespace

int run_mount(const MountOptions& options, const Catalog& catalog,
              const std::function<void(const Status&)>& ready) {
  Status st;
  auto source = std::shared_ptr<Source>(make_source(options.source, options, st));
  if (!source) {
    ready(st);
    return 1;
  }
  auto cache_dir = options.cache_dir.empty() ? default_cache_dir() : options.cache_dir;
  auto cache = BlockCache::open(cache_dir, catalog.identity(), st);
  if (!cache) {
    ready(st);
    return 1;
  }
  const auto local_dir = cache_dir / "local";
  std::error_code ec;
  std::filesystem::create_directories(local_dir, ec);

  EngineOptions eo;
  eo.block_size = options.block_size;
  eo.retry_budget = options.timeout;
  eo.max_request = std::max<uint64_t>(eo.max_request, eo.block_size);
  auto engine = std::make_unique<FetchEngine>(source, *cache, eo);
  for (const auto& f : catalog.files()) engine->add_file(f.path, f.size, f.mode);
  // Every file's attributes come from the source: ask for them all at once,
  // pipelined, so the restore's lookups rarely wait for a round trip.
  engine->validate_all();

  std::unique_ptr<TraceRecorder> recorder;
  if (!options.record_trace.empty()) {
    recorder =
        std::make_unique<TraceRecorder>(options.record_trace, options.trace_seconds, eo.block_size);
  }

  fs::FsOptions fo;
  fo.trace = recorder.get();
  fo.read_only = options.read_only;
  fo.local_dir = local_dir;
  fo.max_readahead = static_cast<uint32_t>(std::min<uint64_t>(eo.block_size, 1 << 20));
  fs::BuildReport report;
  fs::LazyFs lfs(catalog, *engine, fo, options.compat_names, report);
  for (const auto& c : report.conflicts) {
    log::warn("mount", "not shown: {} (a file stands where a directory must be)", c);
  }
  for (const auto& c : report.compat_collisions) {
    log::warn("mount", "compat name {} collides with another entry; not shown", c);
  }

  std::vector<std::string> args{"lazyfs"};
  std::string opts = "fsname=lazyfs,subtype=lazyfs";
  if (::geteuid() == 0) opts += ",allow_other,default_permissions";
  if (options.read_only) opts += ",ro";
  for (const auto& o : options.fuse_options) opts += "," + o;
  args.push_back("-o");
  args.push_back(opts);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  fuse_args fargs = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  const auto& ops = fs::lazyfs_ops();
  fuse_session* se = fuse_session_new(&fargs, &ops, sizeof ops, &lfs);
  if (!se) {
    ready(Status::permanent(EINVAL, fmt::format("invalid FUSE options: {}", opts)));
    return 2;
  }
  if (fuse_set_signal_handlers(se) != 0 ||
      fuse_session_mount(se, options.mountpoint.c_str()) != 0) {
    fuse_session_destroy(se);
    ready(Status::permanent(EIO, fmt::format("cannot mount at {} (is /dev/fuse usable?)",
                                             options.mountpoint.string())));
    return 1;
  }
  Extras extras;
  extras.trace = recorder.get();
  // A trace's blocks, fetched ahead of everything but readers' demand.
  std::vector<FetchEngine::FileId> trace_order;
  {
    std::unordered_map<std::string, FetchEngine::FileId> ids;
    for (FetchEngine::FileId id = 0; id < catalog.files().size(); ++id) {
      ids.emplace(catalog.files()[id].path, id);
    }
    std::set<std::string> unknown;
    std::set<FetchEngine::FileId> ordered;
    for (const auto& r : options.prefetch) {
      auto it = ids.find(r.path);
      if (it == ids.end()) {
        ++extras.prefetch_skipped;
        if (unknown.insert(r.path).second) {
          log::warn("prefetch", "skipping path={}: not a file of this checkpoint", r.path);
        }
        continue;
      }
      ++extras.prefetch_records;
      engine->request(it->second, r.offset, r.length, Priority::kPrefetch, {});
      if (ordered.insert(it->second).second) trace_order.push_back(it->second);
    }
  }
  std::unique_ptr<BackgroundFill> fill;
  if (options.fill) {
    FillOptions fill_options;
    fill_options.rate = options.fill_rate;
    fill_options.first = trace_order;
    fill = std::make_unique<BackgroundFill>(*engine, fill_options);
    extras.fill = fill.get();
  }
  // Ends the trace when its window has passed, even if no read comes then.
  std::mutex trace_mutex;
  std::condition_variable trace_cv;
  bool stopping = false;
  std::thread trace_timer;
  if (recorder) {
    trace_timer = std::thread([&] {
      std::unique_lock lock(trace_mutex);
      trace_cv.wait_for(lock, options.trace_seconds, [&] { return stopping; });
      std::string error;
      if (!recorder->finish(error)) log::error("trace", "{}", error);
    });
  }

  std::unique_ptr<ControlServer> control;
  {
    Status cst;
    control = std::make_unique<ControlServer>(
        control_socket_path(options.mountpoint),
        [&] { return render_status(options, catalog, *engine, lfs, extras); }, cst);
    if (!cst.ok()) log::warn("mount", "no status socket: {}", cst.message());
  }
  log::info("mount", "serving mountpoint={} checkpoint={} files={} source={} cache={}",
            options.mountpoint.string(), catalog.identity().substr(0, 16), catalog.files().size(),
            source->describe(), cache_dir.string());
  ready({});

  fuse_loop_config* config = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(config, 16);
  fuse_loop_cfg_set_idle_threads(config, 4);
  int rc = fuse_session_loop_mt(se, config);
  fuse_loop_cfg_destroy(config);
  log::info("mount", "unmounting mountpoint={} reason={}", options.mountpoint.string(),
            rc > 0 ? fmt::format("signal {}", rc) : std::string("unmounted"));
  control.reset();
  fill.reset();
  if (trace_timer.joinable()) {
    {
      std::lock_guard lock(trace_mutex);
      stopping = true;
    }
    trace_cv.notify_all();
    trace_timer.join();
  }
  fuse_session_unmount(se);
  engine.reset();  // answers what is still parked, flushes the cache maps
  fuse_remove_signal_handlers(se);
  fuse_session_destroy(se);
  return rc < 0 ? 1 : 0;
}

}  // namespace lazyfs::cli
