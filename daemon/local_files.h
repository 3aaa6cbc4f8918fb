// LocalFiles: the backing files of the regular files the restored process
// creates in the mount. Each is a named file in the checkpoint's own local
// directory, removed when its node goes (nothing made in the mount outlives
// the daemon). A process may make more files than the daemon may hold
// descriptors: only the `max_open` most recently used stay open, and the
// others are reopened by name when next used, as the cache does with its
// data files.
//
// Lock order: LocalFiles::mutex_ is a leaf.
#pragma once

#include <filesystem>
#include <list>
#include <memory>
#include <mutex>
#include <system_error>

#include "lazyfs/fileio.h"

namespace lazyfs::fs {

class LocalFiles;

class LocalFile {
 public:
  ~LocalFile();  // removes the file
  LocalFile(const LocalFile&) = delete;
  LocalFile& operator=(const LocalFile&) = delete;

  // The open file, reopened if it was closed; null with `err` if that fails.
  // Whoever holds it keeps it open.
  std::shared_ptr<const UniqueFd> fd(int& err);

 private:
  friend class LocalFiles;
  LocalFile(std::shared_ptr<LocalFiles> owner, std::filesystem::path path);

  const std::shared_ptr<LocalFiles> owner_;
  const std::filesystem::path path_;
  // Guarded by owner_->mutex_:
  std::shared_ptr<const UniqueFd> fd_;
  std::list<LocalFile*>::iterator lru_pos_;
  bool in_lru_ = false;
};

class LocalFiles : public std::enable_shared_from_this<LocalFiles> {
 public:
  // Makes `dir` (mode 0700) and empties it of what a daemon that died left
  // there; the caller must own it (the cache's lock on the checkpoint).
  // `max_open` 0: a quarter of RLIMIT_NOFILE's soft limit, 16 to 4096.
  static std::shared_ptr<LocalFiles> open(const std::filesystem::path& dir, size_t max_open,
                                          std::error_code& ec);

  // A new empty file, open; null with `err` if it cannot be made.
  std::shared_ptr<LocalFile> create(int& err);
  const std::filesystem::path& dir() const { return dir_; }
  size_t max_open() const { return max_open_; }
  size_t open_files() const;

 private:
  friend class LocalFile;
  LocalFiles(std::filesystem::path dir, size_t max_open);
  // With mutex_ held: `f` was opened or used; closes the least recently
  // used past max_open_.
  void opened_locked(LocalFile* f);

  const std::filesystem::path dir_;
  const size_t max_open_;
  mutable std::mutex mutex_;
  uint64_t next_name_ = 0;     // guarded by mutex_
  std::list<LocalFile*> lru_;  // guarded by mutex_; the open files, newest first
};

}  // namespace lazyfs::fs
