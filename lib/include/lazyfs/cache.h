// The block cache: one sparse data file per served file, under a cache
// directory (mode 0700), and beside it a range map saying which bytes of the
// data file are present and which were written locally.
//
// Files are named from SHA-256(checkpoint identity, path), never from the
// raw path, so a hostile name cannot reach the file system and two
// checkpoints never share or mix cache files.
//
// The map is kept in an extended attribute of the data file (user.lazyfs)
// where it fits one (up to 2 KiB; on ext4 a whole file's map fits inside its
// inode), so that a cached file costs one inode; a longer map, or one on a
// file system without user attributes, goes to a `.map` file beside it. The
// attribute wins: a .map file is read only if the data file has none.
//
// Crash safety: bytes are marked present only after their pwrite returned;
// flush() snapshots the maps, makes the data durable (fdatasync), and only
// then replaces the map atomically (the attribute in one setxattr, made
// durable by fsync; a .map file by temporary file, fsync, rename, fsync of
// the directory). A crash at any point leaves a map that may miss bytes
// that are present, but never claims a byte that is not. Flushes are batched
// by the caller (the engine flushes on a timer and at shutdown), not done
// per block; flush_all() does many files at a time, with a syncfs of the
// file system in place of each step's fsync per file (data; new maps;
// renames). There a file's first .map file is written in place instead: a
// crash may tear it, but a torn map fails its checksum and is discarded (the
// file starts cold, never wrong).
//
// Locally written bytes are the file's truth: a fetch that lands later never
// overwrites them.
//
// Open files: a BlockCache keeps at most max_open_files() data files open
// (a quarter of the process's limit on open files, by default), closing the
// least recently used; a file reopens its data file when next used. fd()
// hands out a shared reference, so a data file that is closed while a reader
// still uses it stays open until that reader is done.
//
// Lock order: BlockCache::mutex_, then a CacheFile::mutex_, then
// BlockCache::lru_mutex_; under lru_mutex_ other files' mutexes are only
// tried (try_lock), never waited for. None is held across network I/O (the
// cache does none).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "lazyfs/fileio.h"
#include "lazyfs/ranges.h"
#include "lazyfs/source.h"
#include "lazyfs/status.h"

namespace lazyfs {

class BlockCache;

// A data file's descriptor, open for as long as someone holds it.
using SharedFd = std::shared_ptr<const UniqueFd>;

class CacheFile {
 public:
  // Opens the data and map files `base`.data and `base`.map. A map that is
  // missing, unreadable, corrupt, or written for another checkpoint, path or
  // source size is discarded: the cache then starts cold for this file, never
  // wrong. A cold file's data file is created (or emptied) at its first
  // write, so files that are never read cost nothing on disk.
  //
  // `source_stat` is the source's stat of the file now, if it was asked. The
  // map records the stat its fetched bytes came with; if the mtime (or type)
  // differs, the file changed on the source since, and the fetched bytes are
  // forgotten (local ones kept) unless the file is wholly present. Opened
  // without one, the file takes the map's.
  static std::unique_ptr<CacheFile> open(const std::filesystem::path& base,
                                         const std::string& checkpoint_id, const std::string& path,
                                         uint64_t source_size, Status& status,
                                         const std::optional<SourceStat>& source_stat = {});

  // The data file, for reads of present bytes (pread, splice); created or
  // reopened if need be (null if that fails, logged).
  SharedFd fd();
  const std::string& path() const { return path_; }
  // The size of the file on the source, as given to open().
  uint64_t source_size() const { return source_size_; }
  // The source's stat that the present fetched bytes go with: given to
  // open(), or the map's; unknown for a map of version 1 opened without one.
  std::optional<SourceStat> source_stat() const;
  // Every byte below size() is present: the file no longer needs the source.
  bool wholly_present() const;
  // The current size: the source size until a local truncate or a write past
  // the end changes it.
  uint64_t size() const;

  bool present(Range r) const;
  std::vector<Range> missing(Range r) const;
  uint64_t present_bytes() const;
  uint64_t local_bytes() const;
  // size(), present_bytes(), local_bytes() and dirty() at one instant.
  struct Counts {
    uint64_t size = 0;
    uint64_t present_bytes = 0;
    uint64_t local_bytes = 0;
    bool dirty = false;
  };
  Counts counts() const;
  RangeSet present_set() const;
  RangeSet local_set() const;

  // Stores bytes fetched from the source at `offset`, except those written
  // locally, and marks them present. Bytes past size() are dropped.
  Status write_fetched(uint64_t offset, std::span<const std::byte> data);
  // Stores bytes written locally and marks them present and local; a write
  // past the end grows the file.
  Status write_local(uint64_t offset, std::span<const std::byte> data);
  // Sets the size locally. Bytes from the old size (or the new one, if
  // smaller) on are local: zeros when the file grows, gone when it shrinks.
  Status truncate_local(uint64_t new_size);

  // Makes everything present so far durable and records it in the map, as
  // described above. Cheap when nothing changed since the last flush.
  Status flush();
  bool dirty() const;

  ~CacheFile();
  CacheFile(const CacheFile&) = delete;
  CacheFile& operator=(const CacheFile&) = delete;

 private:
  CacheFile() = default;
  // The map as read: its bytes, or why they could not be read.
  struct MapRead {
    std::error_code error;
    std::vector<uint8_t> bytes;
    bool in_attribute = false;  // the data file's attribute, not a .map file
  };
  // A map encoded for each place it may go: `attribute` is empty if it
  // should not go there (too long, or the file system takes none).
  struct EncodedMap {
    std::string attribute;
    std::string file;
  };
  // open() with the map already read (or known to be missing).
  static std::unique_ptr<CacheFile> open_with_map(const std::filesystem::path& base,
                                                  const std::string& checkpoint_id,
                                                  const std::string& path, uint64_t source_size,
                                                  MapRead map, Status& status,
                                                  const std::optional<SourceStat>& source_stat);
  // The map of the files `base`.data and `base`.map: the data file's
  // attribute, else the .map file; ENOENT if neither is there (or no data
  // file: a .map file without one is removed before a new one is made).
  static MapRead read_map(const std::filesystem::path& base);
  Status load_map_locked(MapRead map);
  bool attributes_usable() const;
  // setxattr failed with `err`: true if the map should go to a .map file
  // instead (the file system takes no attributes, or not one this long).
  bool attribute_refused(int err);
  // With flush_mutex_ held: the map is now in the attribute (removes a .map
  // file left from before) or in the .map file (removes the attribute, which
  // would win over it; true if there was one, whose removal must be made
  // durable before anything relies on the new map).
  void map_now_in_attribute();
  Status map_now_in_file(bool& removed_attribute);
  // flush() and a shrinking truncate_local(): makes the data durable (through
  // `sync_fd`, by syncfs if `whole_fs`, else fdatasync), then `map` the map,
  // durably.
  Status commit_map(int sync_fd, bool whole_fs, const EncodedMap& map);
  // Closes the data file (it reopens when next used); with mutex_ held.
  void close_data_locked();
  void adopt_source_stat_locked(const std::optional<SourceStat>& recorded);
  Status ensure_data_locked();
  EncodedMap encode_locked() const;
  EncodedMap encode(uint64_t size, const RangeSet& present, const RangeSet& local) const;

  std::filesystem::path data_path_;
  std::filesystem::path map_path_;
  std::string checkpoint_id_;
  std::string path_;
  uint64_t source_size_ = 0;
  mutable std::mutex mutex_;
  std::optional<SourceStat> source_stat_;    // guarded by mutex_
  std::shared_ptr<UniqueFd> fd_;             // guarded by mutex_; open while in use
  bool data_exists_ = false;                 // guarded by mutex_; the data file was made
  uint64_t closed_at_generation_ = 0;        // guarded by mutex_; see close_data_locked()
  BlockCache* owner_ = nullptr;              // set once, before the file is shared
  std::list<CacheFile*>::iterator lru_pos_;  // guarded by the owner's lru_mutex_
  bool in_lru_ = false;                      // guarded by the owner's lru_mutex_
  uint64_t size_ = 0;                        // guarded by mutex_
  RangeSet present_;                         // guarded by mutex_
  RangeSet local_;                           // guarded by mutex_
  uint64_t generation_ = 0;                  // guarded by mutex_; bumped by every change
  uint64_t flushed_generation_ = 0;          // written under flush_mutex_ and mutex_
  std::mutex flush_mutex_;                   // one flush at a time; taken before mutex_
  bool map_in_attribute_ = false;            // guarded by flush_mutex_; the data file has one
  bool map_file_ = false;                    // guarded by flush_mutex_; a .map file may be there
  bool no_attributes_ = false;               // guarded by flush_mutex_; setxattr said ENOTSUP

  friend class BlockCache;  // flush_all() commits many files' maps as one batch
};

// The cache directory of one checkpoint: hands out one CacheFile per path.
class BlockCache {
 public:
  // Creates `dir` (mode 0700) if needed; refuses a dir that others can read.
  // Holds a lock on the checkpoint's caches in `dir` for its life (flock of
  // `<hash of the checkpoint id>.lock`, which names the holder's pid): a
  // second BlockCache of the same checkpoint and directory, in this process
  // or another, fails with EBUSY until the first is gone, as two writers of
  // one file's map would lose each other's ranges. Other checkpoints' caches
  // in the same directory are not affected.
  // `max_open_files` bounds the data files kept open (0: a quarter of
  // RLIMIT_NOFILE's soft limit, between 16 and 4096).
  static std::unique_ptr<BlockCache> open(const std::filesystem::path& dir,
                                          const std::string& checkpoint_id, Status& status,
                                          size_t max_open_files = 0);
  ~BlockCache();

  // The cache file for `path` (opened on first use, with `source_stat` as
  // CacheFile::open takes it), or null with `status`.
  CacheFile* file(const std::string& path, uint64_t source_size, Status& status,
                  const std::optional<SourceStat>& source_stat = {});
  // The cache file for `path` if its map says it is wholly present and with
  // what stat from the source: such a file is served without the source.
  // Null otherwise (a file opened only to look is closed again). Without a
  // source size (none was recorded), the map's is taken.
  CacheFile* wholly_present_file(const std::string& path, std::optional<uint64_t> source_size);

  // The name stem of `path`'s files inside the directory.
  std::string stem(const std::string& path) const;

  // Flushes every file as flush() does, in batches that share the costly
  // steps: one syncfs makes the batch's data durable, one its new maps
  // (first maps in place, the others in temporary files), one the renames
  // of those (if any), instead of an fsync per file for each. The first
  // failure is returned; the other files are still flushed.
  Status flush_all();
  const std::filesystem::path& dir() const { return dir_; }
  size_t max_open_files() const { return max_open_; }
  // Data files open now (for tests and status).
  size_t open_files() const;

 private:
  // Adds the files it flushed to `flushed`.
  Status flush_batch(std::span<CacheFile* const> files, size_t& flushed);

  friend class CacheFile;
  // Takes a file CacheFile::open() made into this cache.
  CacheFile* adopt(std::unique_ptr<CacheFile> f);
  // With the file's mutex_ held: it opened its data file (closing others'
  // past the limit), or used it.
  void opened(CacheFile* f);
  void used(CacheFile* f);
  void forget(CacheFile* f);

  std::filesystem::path dir_;
  UniqueFd dir_fd_;   // open for the cache's life: its syncfs reports every write-back error
  UniqueFd lock_fd_;  // flocked for the cache's life
  std::string checkpoint_id_;
  size_t max_open_ = 0;
  std::atomic<bool> attribute_maps_{true};  // false once the file system refused one
  std::mutex flush_all_mutex_;              // one batched flush at a time; taken before mutex_
  std::mutex mutex_;
  std::unordered_map<std::string, std::unique_ptr<CacheFile>> files_;  // guarded by mutex_
  // Paths not opened yet whose map wholly_present_file() found missing:
  // file() opens them without looking again (only this cache writes maps of
  // this checkpoint here, and only of files it opened).
  std::unordered_set<std::string> no_map_;  // guarded by mutex_
  mutable std::mutex lru_mutex_;
  std::list<CacheFile*> lru_;  // guarded by lru_mutex_; files with an open data file, newest first
};

}  // namespace lazyfs
