#include "local_files.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include "lazyfs/log.h"

namespace lazyfs::fs {

LocalFile::LocalFile(std::shared_ptr<LocalFiles> owner, std::filesystem::path path)
    : owner_(std::move(owner)), path_(std::move(path)) {}

LocalFile::~LocalFile() {
  {
    std::lock_guard lock(owner_->mutex_);
    if (in_lru_) owner_->lru_.erase(lru_pos_);
  }
  if (::unlink(path_.c_str()) != 0 && errno != ENOENT) {
    log::warn("fuse", "cannot remove local file {}: {}", path_.string(),
              std::error_code(errno, std::system_category()).message());
  }
}

std::shared_ptr<const UniqueFd> LocalFile::fd(int& err) {
  std::lock_guard lock(owner_->mutex_);
  if (!fd_) {
    UniqueFd fd(::open(path_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    if (!fd) {
      err = errno;
      log::warn("fuse", "cannot reopen local file {}: {}", path_.string(),
                std::error_code(err, std::system_category()).message());
      return nullptr;
    }
    fd_ = std::make_shared<const UniqueFd>(std::move(fd));
  }
  owner_->opened_locked(this);
  err = 0;
  return fd_;
}

LocalFiles::LocalFiles(std::filesystem::path dir, size_t max_open)
    : dir_(std::move(dir)), max_open_(max_open) {}

std::shared_ptr<LocalFiles> LocalFiles::open(const std::filesystem::path& dir, size_t max_open,
                                             std::error_code& ec) {
  std::filesystem::create_directories(dir, ec);
  if (ec) return nullptr;
  std::filesystem::permissions(dir, std::filesystem::perms::owner_all, ec);
  if (ec) return nullptr;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    std::filesystem::remove(e.path(), ec);
    if (ec) return nullptr;
  }
  if (ec) return nullptr;
  if (max_open == 0) {
    rlimit rl{};
    const rlim_t soft = ::getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
    max_open = static_cast<size_t>(std::clamp<rlim_t>(soft / 4, 16, 4096));
  }
  return std::shared_ptr<LocalFiles>(new LocalFiles(dir, max_open));
}

std::shared_ptr<LocalFile> LocalFiles::create(int& err) {
  std::lock_guard lock(mutex_);
  for (;;) {
    auto path = dir_ / std::to_string(next_name_++);
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!fd) {
      if (errno == EEXIST) continue;
      err = errno;
      return nullptr;
    }
    std::shared_ptr<LocalFile> f(new LocalFile(shared_from_this(), std::move(path)));
    f->fd_ = std::make_shared<const UniqueFd>(std::move(fd));
    opened_locked(f.get());
    err = 0;
    return f;
  }
}

size_t LocalFiles::open_files() const {
  std::lock_guard lock(mutex_);
  return lru_.size();
}

void LocalFiles::opened_locked(LocalFile* f) {
  if (f->in_lru_) {
    lru_.splice(lru_.begin(), lru_, f->lru_pos_);
  } else {
    f->lru_pos_ = lru_.insert(lru_.begin(), f);
    f->in_lru_ = true;
  }
  while (lru_.size() > max_open_) {
    LocalFile* victim = lru_.back();
    lru_.pop_back();
    victim->in_lru_ = false;
    victim->fd_.reset();  // an op still using it holds its own reference
  }
}

}  // namespace lazyfs::fs
