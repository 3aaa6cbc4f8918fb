// The mount runtime behind lazyfs::Filesystem: catalog, cache, engine, inode
// tree, FUSE session, and what runs beside serving reads (prefetch, fill,
// trace recording, the status socket); started in that order, stopped in
// reverse.
#include "lazyfs/filesystem.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <unordered_map>

#include "control.h"
#include "fuse_fs.h"
#include "lazyfs/fill.h"
#include "lazyfs/hash.h"
#include "lazyfs/log.h"

namespace lazyfs {
namespace {

using cli::ControlServer;

nlohmann::json fill_json(BackgroundFill* fill) {
  if (!fill) return {{"enabled", false}};
  const auto p = fill->progress();
  nlohmann::json j{{"enabled", true},
                   {"state", fill_state_name(p.state)},
                   {"rate_bytes_s", p.rate},
                   {"requested_bytes", p.requested},
                   {"alongside", p.alongside}};
  // --fill-alongside auto: what its trials of each way measured.
  if (p.reads_per_s_pausing > 0) j["reads_per_s_pausing"] = p.reads_per_s_pausing;
  if (p.reads_per_s_alongside > 0) j["reads_per_s_alongside"] = p.reads_per_s_alongside;
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

std::string render_status(const FilesystemOptions& options, const std::filesystem::path& mountpoint,
                          const Catalog& catalog, FetchEngine& engine, fs::LazyFs& lfs,
                          const Extras& extras, bool with_files = true) {
  const auto es = engine.stats();
  auto files = nlohmann::json::array();
  uint64_t total = 0, fetched = 0, present = 0, local = 0;
  bool complete = true;
  for (const auto& f : engine.file_stats(with_files)) {
    const uint64_t size = f.size.value_or(0);
    total += size;
    fetched += f.fetched_bytes;
    present += std::min(f.present_bytes, size);
    local += f.local_bytes;
    complete = complete && f.size && f.present_bytes >= size && f.durable;
    if (!with_files) continue;
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
      {"mountpoint", mountpoint.string()},
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
        {"min_s", es.latency_min_s},
        {"max_s", es.latency_max_s},
        {"ms_log2_buckets", es.latency_ms_log2}}},
      {"ops", ops},
      {"demand_misses", es.demand_misses},
      {"fill", fill_json(extras.fill)},
      {"prefetch", {{"records", extras.prefetch_records}, {"skipped", extras.prefetch_skipped}}},
      {"trace", extras.trace ? nlohmann::json{{"file", options.record_trace.string()},
                                              {"records", extras.trace->records()}}
                             : nlohmann::json(nullptr)}};
  if (with_files) j["files"] = std::move(files);
  return j.dump();
}

// Wakes a thread blocked in fuse_session_loop_mt after fuse_session_exit:
// libfuse's loop waits on a semaphore, which a signal interrupts; it then
// sees the session exited and cancels its workers. SIGUSR2 gets a no-op
// handler unless the program already handles or ignores it.
constexpr int kWakeSignal = SIGUSR2;

void install_wake_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction old {};
    ::sigaction(kWakeSignal, nullptr, &old);
    if (old.sa_handler != SIG_DFL) return;
    struct sigaction sa {};
    sa.sa_handler = [](int) {};
    ::sigemptyset(&sa.sa_mask);
    ::sigaction(kWakeSignal, &sa, nullptr);
  });
}

}  // namespace

struct Filesystem::Impl {
  Impl(const Catalog& c, std::shared_ptr<Source> s, FilesystemOptions o)
      : catalog(c), source(std::move(s)), options(std::move(o)) {}

  Catalog catalog;
  std::shared_ptr<Source> source;
  FilesystemOptions options;
  std::unique_ptr<BlockCache> cache;
  std::unique_ptr<FetchEngine> engine;
  std::unique_ptr<TraceRecorder> recorder;
  std::unique_ptr<fs::LazyFs> lfs;
  fuse_session* se = nullptr;
  std::filesystem::path mountpoint;
  Extras extras;
  std::unique_ptr<BackgroundFill> fill;
  std::unique_ptr<ControlServer> control;
  std::thread trace_timer;
  std::thread server;  // a background serve()
  bool signals = false;

  pthread_t serving_thread{};  // guarded by mutex while serving

  std::mutex mutex;  // guards the fields below and the unmount
  std::condition_variable cv;
  bool mounted = false;
  bool stopping = false;
  bool serving = false;

  void start_extras();
  void wait_for_prefetch(std::vector<FetchEngine::RangeRequest> ranges);
  void unmount();
};

Filesystem::Filesystem(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<Filesystem> Filesystem::create(const Catalog& catalog,
                                               std::shared_ptr<Source> source,
                                               FilesystemOptions options, Status& status) {
  auto impl = std::make_unique<Impl>(catalog, std::move(source), std::move(options));
  auto& o = impl->options;
  if (o.cache_dir.empty()) {
    status = Status::permanent(EINVAL, "no cache directory given");
    return nullptr;
  }
  impl->cache = BlockCache::open(o.cache_dir, catalog.identity(), status);
  if (!impl->cache) return nullptr;
  // Files made in the mount: the checkpoint's own directory, which the
  // cache's lock on the checkpoint makes this daemon's alone.
  std::error_code ec;
  auto local_files =
      fs::LocalFiles::open(o.cache_dir / "local" / sha256_hex(catalog.identity()), 0, ec);
  if (!local_files) {
    status = Status::permanent(
        ec.value(),
        fmt::format("cannot prepare {}: {}", (o.cache_dir / "local").string(), ec.message()));
    return nullptr;
  }

  o.engine.max_request = std::max<uint64_t>(o.engine.max_request, o.engine.block_size);
  impl->engine = std::make_unique<FetchEngine>(impl->source, *impl->cache, o.engine);
  for (const auto& f : catalog.files()) impl->engine->add_file(f.path, f.size, f.mode);
  // Every file's attributes come from the source: ask for them all at once,
  // pipelined, so the restore's lookups rarely wait for a round trip.
  // A trace's files first: their prefetch starts as soon as they are known.
  std::vector<FetchEngine::FileId> traced;
  {
    std::unordered_map<std::string, FetchEngine::FileId> ids;
    for (FetchEngine::FileId id = 0; id < catalog.files().size(); ++id) {
      ids.emplace(catalog.files()[id].path, id);
    }
    std::set<FetchEngine::FileId> seen;
    for (const auto& r : o.prefetch) {
      auto it = ids.find(r.path);
      if (it != ids.end() && seen.insert(it->second).second) traced.push_back(it->second);
    }
  }
  impl->engine->validate_all(traced);

  if (!o.record_trace.empty()) {
    impl->recorder =
        std::make_unique<TraceRecorder>(o.record_trace, o.trace_seconds, o.engine.block_size);
  }
  fs::FsOptions fo;
  fo.trace = impl->recorder.get();
  fo.read_only = o.read_only;
  fo.local_files = std::move(local_files);
  fo.max_readahead = static_cast<uint32_t>(std::min<uint64_t>(o.engine.block_size, 1 << 20));
  fs::BuildReport report;
  impl->lfs =
      std::make_unique<fs::LazyFs>(impl->catalog, *impl->engine, fo, o.compat_names, report);
  for (const auto& c : report.conflicts) {
    log::warn("mount", "not shown: {} (a file stands where a directory must be)", c);
  }
  for (const auto& c : report.compat_collisions) {
    log::warn("mount", "compat name {} collides with another entry; not shown", c);
  }
  impl->extras.trace = impl->recorder.get();
  status = {};
  return std::unique_ptr<Filesystem>(new Filesystem(std::move(impl)));
}

Status Filesystem::mount(const std::filesystem::path& mountpoint) {
  auto& m = *impl_;
  if (m.se) return Status::permanent(EBUSY, "already mounted");
  m.mountpoint = mountpoint;
  std::vector<std::string> args{"lazyfs"};
  std::string opts = "fsname=lazyfs,subtype=lazyfs";
  if (m.options.allow_other) opts += ",allow_other,default_permissions";
  if (m.options.read_only) opts += ",ro";
  for (const auto& o : m.options.fuse_options) opts += "," + o;
  args.push_back("-o");
  args.push_back(opts);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  fuse_args fargs = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  const auto& ops = fs::lazyfs_ops();
  m.se = fuse_session_new(&fargs, &ops, sizeof ops, m.lfs.get());
  fuse_opt_free_args(&fargs);
  if (!m.se) return Status::permanent(EINVAL, fmt::format("invalid FUSE options: {}", opts));
  if (fuse_session_mount(m.se, mountpoint.c_str()) != 0) {
    fuse_session_destroy(m.se);
    m.se = nullptr;
    return Status::permanent(
        EIO, fmt::format("cannot mount at {} (is /dev/fuse usable?)", mountpoint.string()));
  }
  {
    std::lock_guard lock(m.mutex);
    m.mounted = true;
  }
  m.start_extras();
  log::info("mount", "mounted mountpoint={} checkpoint={} files={} source={} cache={}",
            mountpoint.string(), m.catalog.identity().substr(0, 16), m.catalog.files().size(),
            m.source->describe(), m.options.cache_dir.string());
  return {};
}

void Filesystem::Impl::start_extras() {
  // A trace's blocks, fetched ahead of everything but readers' demand.
  std::vector<FetchEngine::FileId> trace_order;
  std::unordered_map<std::string, FetchEngine::FileId> ids;
  for (FetchEngine::FileId id = 0; id < catalog.files().size(); ++id) {
    ids.emplace(catalog.files()[id].path, id);
  }
  std::set<std::string> unknown;
  std::set<FetchEngine::FileId> ordered;
  // Queued together, in the trace's order, a record that continues the one
  // before it (same file, adjacent or overlapping) joined to it: the engine
  // sends them as few, pipelined source requests.
  std::vector<FetchEngine::RangeRequest> prefetch;
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
    if (ordered.insert(it->second).second) trace_order.push_back(it->second);
    if (!prefetch.empty()) {
      auto& last = prefetch.back();
      const uint64_t end = last.offset + last.length;
      if (last.file == it->second && r.offset >= last.offset && r.offset <= end) {
        last.length = std::max(end, r.offset + r.length) - last.offset;
        continue;
      }
    }
    prefetch.push_back({it->second, r.offset, r.length, {}});
  }
  wait_for_prefetch(std::move(prefetch));
  if (options.fill) {
    FillOptions fill_options;
    fill_options.rate = options.fill_rate;
    fill_options.alongside = options.fill_alongside;
    fill_options.adapt = options.fill_adapt;
    fill_options.first = trace_order;
    fill = std::make_unique<BackgroundFill>(*engine, fill_options);
    extras.fill = fill.get();
  }
  if (recorder) {
    // Ends the trace when its window has passed, even if no read comes then.
    trace_timer = std::thread([this] {
      {
        std::unique_lock lock(mutex);
        cv.wait_for(lock, options.trace_seconds, [&] { return stopping; });
      }
      std::string error;
      if (!recorder->finish(error)) log::error("trace", "{}", error);
    });
  }
  if (options.control_socket) {
    Status cst;
    control = std::make_unique<ControlServer>(
        cli::control_socket_path(mountpoint),
        [this](bool with_files) {
          return render_status(options, mountpoint, catalog, *engine, *lfs, extras, with_files);
        },
        cst);
    if (!cst.ok()) log::warn("mount", "no status socket: {}", cst.message());
  }
}

// Queues the prefetch; with options.prefetch_wait, returns only once every
// range is local (or failed), or that time has passed, so that a restore
// started next finds them present.
void Filesystem::Impl::wait_for_prefetch(std::vector<FetchEngine::RangeRequest> ranges) {
  const size_t total = ranges.size();
  if (total == 0) return;
  if (options.prefetch_wait.count() <= 0) {
    engine->request_many(std::move(ranges), Priority::kPrefetch);
    return;
  }
  struct Count {
    std::mutex mutex;
    std::condition_variable cv;
    size_t done = 0;
  };
  auto count = std::make_shared<Count>();  // outlives a wait that times out
  for (auto& r : ranges) {
    r.done = [count](const Status&) {
      std::lock_guard lock(count->mutex);
      ++count->done;
      count->cv.notify_all();
    };
  }
  const auto t0 = std::chrono::steady_clock::now();
  engine->request_many(std::move(ranges), Priority::kPrefetch);
  std::unique_lock lock(count->mutex);
  const bool all =
      count->cv.wait_for(lock, options.prefetch_wait, [&] { return count->done == total; });
  log::info(
      "prefetch", "{} of {} ranges ready after {:.0f} ms{}", count->done, total,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(),
      all ? "" : " (--prefetch-wait ran out)");
}

// Stops what runs beside serving and unmounts (once).
void Filesystem::Impl::unmount() {
  {
    std::lock_guard lock(mutex);
    if (!mounted) return;
    mounted = false;
    stopping = true;
    cv.notify_all();
  }
  control.reset();
  extras.fill = nullptr;
  fill.reset();
  if (trace_timer.joinable()) trace_timer.join();
  // Every parked request is answered, and no engine thread is left to
  // answer one, before the unmount closes the FUSE descriptor: a reply
  // written after that would race the close, or land in whatever file
  // reused the descriptor's number.
  engine->stop();
  fuse_session_unmount(se);
  log::info("mount", "unmounted mountpoint={}", mountpoint.string());
}

int Filesystem::serve() {
  auto& m = *impl_;
  if (!m.se) return -EINVAL;
  install_wake_handler();
  {
    std::lock_guard lock(m.mutex);
    m.serving = true;
    m.serving_thread = ::pthread_self();
  }
  fuse_loop_config* config = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(config, 16);
  fuse_loop_cfg_set_idle_threads(config, 4);
  int rc = fuse_session_loop_mt(m.se, config);
  fuse_loop_cfg_destroy(config);
  if (rc > 0) log::info("mount", "signal={} mountpoint={}", rc, m.mountpoint.string());
  m.unmount();
  {
    std::lock_guard lock(m.mutex);
    m.serving = false;
    m.cv.notify_all();
  }
  return rc;
}

Status Filesystem::start() {
  auto& m = *impl_;
  if (!m.se) return Status::permanent(EINVAL, "not mounted");
  if (m.server.joinable()) return Status::permanent(EBUSY, "already serving");
  m.server = std::thread([this] { serve(); });
  return {};
}

void Filesystem::stop() {
  auto& m = *impl_;
  if (!m.se) return;
  fuse_session_exit(m.se);
  {
    // Wake the serving loop until it has seen the exit (a signal that comes
    // before it waits is lost, so keep knocking).
    std::unique_lock lock(m.mutex);
    while (m.serving) {
      ::pthread_kill(m.serving_thread, kWakeSignal);
      m.cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return !m.serving; });
    }
  }
  m.unmount();  // if serve() never ran
  if (m.server.joinable()) m.server.join();
}

Status Filesystem::handle_signals() {
  auto& m = *impl_;
  if (!m.se) return Status::permanent(EINVAL, "not mounted");
  if (fuse_set_signal_handlers(m.se) != 0) {
    return Status::permanent(EIO, "cannot install signal handlers");
  }
  m.signals = true;
  return {};
}

Filesystem::~Filesystem() {
  stop();
  auto& m = *impl_;
  m.engine.reset();  // answers what is still parked, flushes the cache maps
  if (m.se) {
    if (m.signals) fuse_remove_signal_handlers(m.se);
    fuse_session_destroy(m.se);
  }
}

std::string Filesystem::status_json() const {
  auto& m = *impl_;
  return render_status(m.options, m.mountpoint, m.catalog, *m.engine, *m.lfs, m.extras);
}

FetchEngine& Filesystem::engine() {
  return *impl_->engine;
}

const std::filesystem::path& Filesystem::mountpoint() const {
  return impl_->mountpoint;
}

}  // namespace lazyfs
