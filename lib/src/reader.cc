#include "lazyfs/reader.h"

#include <fmt/core.h>

#include <cerrno>
#include <condition_variable>
#include <mutex>

#include "lazyfs/fileio.h"

namespace lazyfs {

std::unique_ptr<LazyReader> LazyReader::open(const Catalog& catalog, std::shared_ptr<Source> source,
                                             const ReaderOptions& options, Status& status) {
  std::unique_ptr<LazyReader> r(new LazyReader());
  r->cache_ = BlockCache::open(options.cache_dir, catalog.identity(), status);
  if (!r->cache_) return nullptr;
  r->engine_ = std::make_unique<FetchEngine>(std::move(source), *r->cache_, options.engine);
  for (const auto& f : catalog.files()) {
    r->ids_.emplace(f.path, r->engine_->add_file(f.path, f.size, f.mode));
  }
  status = {};
  return r;
}

namespace {

// Blocks until a completion arrives.
class Wait {
 public:
  FetchEngine::Completion completion() {
    return [this](const Status& st) {
      std::lock_guard lock(mutex_);
      status_ = st;
      done_ = true;
      cv_.notify_all();
    };
  }
  Status get() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return done_; });
    return status_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  Status status_;
};

}  // namespace

Status LazyReader::size(const std::string& path, uint64_t& out) {
  auto it = ids_.find(path);
  if (it == ids_.end()) {
    return Status::permanent(ENOENT, fmt::format("{} is not a file of this checkpoint", path));
  }
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  Status result;
  engine_->file_info(it->second, [&](const Status& st, const FileInfo& info) {
    std::lock_guard lock(m);
    result = st;
    out = info.size;
    done = true;
    cv.notify_all();
  });
  std::unique_lock lock(m);
  cv.wait(lock, [&] { return done; });
  if (result.ok()) out = engine_->known_size(it->second).value_or(out);
  return result;
}

Status LazyReader::read(const std::string& path, uint64_t offset, std::span<std::byte> buf,
                        size_t& got) {
  got = 0;
  uint64_t file_size = 0;
  if (auto st = size(path, file_size); !st.ok()) return st;
  if (offset >= file_size || buf.empty()) return {};
  const auto len = static_cast<size_t>(std::min<uint64_t>(buf.size(), file_size - offset));
  const auto id = ids_.at(path);
  Wait wait;
  engine_->request(id, offset, len, Priority::kDemand, wait.completion());
  if (auto st = wait.get(); !st.ok()) return st;
  const SharedFd fd = engine_->cache_file(id)->fd();
  if (!fd) return Status::permanent(EIO, fmt::format("cannot open the cache of {}", path));
  if (auto ec = pread_all(fd->get(), buf.data(), len, offset)) {
    return Status::permanent(ec.value(),
                             fmt::format("reading the cache of {}: {}", path, ec.message()));
  }
  got = len;
  return {};
}

}  // namespace lazyfs
