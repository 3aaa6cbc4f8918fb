// LazyReader: a checkpoint's files read lazily without mounting anything, for
// a program that wants the bytes, not a file system. Reads block the calling
// thread until their blocks are in the cache (fetched as the mount would:
// same engine, same cache, same retries and time-outs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>

#include "lazyfs/cache.h"
#include "lazyfs/catalog.h"
#include "lazyfs/engine.h"
#include "lazyfs/source.h"

namespace lazyfs {

struct ReaderOptions {
  std::filesystem::path cache_dir;  // required; created 0700
  EngineOptions engine;
};

class LazyReader {
 public:
  // Null with `status` if the cache cannot be opened.
  static std::unique_ptr<LazyReader> open(const Catalog& catalog, std::shared_ptr<Source> source,
                                          const ReaderOptions& options, Status& status);

  // Reads up to buf.size() bytes at `offset` of the served file `path` (its
  // path in the checkpoint) into `buf`; `got` is short only at the end of the
  // file. ENOENT for a path the checkpoint does not serve; EIO (with the
  // reason) when the source fails past the retry budget or the file is stale.
  Status read(const std::string& path, uint64_t offset, std::span<std::byte> buf, size_t& got);

  // The file's size (the checkpoint's, or the source's if none was recorded).
  Status size(const std::string& path, uint64_t& out);

  FetchEngine& engine() { return *engine_; }

 private:
  LazyReader() = default;

  std::unique_ptr<BlockCache> cache_;
  std::unique_ptr<FetchEngine> engine_;  // after cache_: destroyed first
  std::unordered_map<std::string, FetchEngine::FileId> ids_;
};

}  // namespace lazyfs
