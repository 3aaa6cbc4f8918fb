// The FUSE adapter: libfuse lowlevel ops over the inode tree and the fetch
// engine. Glue only: the ops are small free functions (lfs_lookup, lfs_read,
// ...) in one fuse_lowlevel_ops table, reaching their state through
// fuse_req_userdata(). No op waits on the network: a read of missing bytes is
// parked and answered from the engine's completion; reads of present bytes
// are answered at once from the cache file with fuse_reply_data (splice).
//
// Every op catches every exception and answers an errno; an unknown inode
// gets ESTALE. A parked reply is answered exactly once: by its completion, by
// an interrupt (EINTR), or with EIO if it is dropped unanswered.
//
// Lock order: ReplyTable::mutex_ and InodeTree's lock are leaves with respect
// to each other (never held together); both come before engine locks. No lock
// is held across a fuse_reply_* call.
#pragma once

#include "inode_tree.h"

#include <array>
#include <atomic>
#include <filesystem>
#include <string>
#include <unordered_map>

#include "lazyfs/engine.h"
#include "lazyfs/trace.h"

namespace lazyfs::fs {

// Parked requests by id. The id, not a pointer, is what an interrupt callback
// gets, so a callback racing with the completion can never touch freed state.
class ReplyTable {
 public:
  uint64_t park(fuse_req_t req);
  // The request if it is still parked (removing it), or null if it was
  // already answered.
  fuse_req_t claim(uint64_t id);
  size_t parked() const;

 private:
  mutable std::mutex mutex_;
  uint64_t next_id_ = 1;                             // guarded by mutex_
  std::unordered_map<uint64_t, fuse_req_t> parked_;  // guarded by mutex_
};

struct FsOptions {
  bool read_only = false;
  double attr_timeout = 10.0;               // seconds the kernel may cache attributes
  std::shared_ptr<LocalFiles> local_files;  // backing files of files created in the mount
  // The largest read-ahead the kernel may ask of us. A page fault in a mapped
  // file makes the kernel read this much around the page, and each such read
  // must be fetched whole before the fault is answered; sequential readers do
  // not need a large one, since the engine reads ahead of them itself.
  uint32_t max_readahead = 128 << 10;
  TraceRecorder* trace = nullptr;  // records demand reads (--record-trace)
};

// Per-op counters, for `lazyfs status`.
enum class Op {
  kLookup,
  kGetattr,
  kSetattr,
  kReaddir,
  kOpen,
  kRead,
  kWrite,
  kFsync,
  kCreate,
  kUnlink,
  kRename,
  kMkdir,
  kOther,
  kCount
};
struct OpCounter {
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint64_t> parked{0};  // answered later, from a completion
};
const char* op_name(Op op);

class LazyFs {
 public:
  LazyFs(const Catalog& catalog, FetchEngine& engine, FsOptions options, bool compat_names,
         BuildReport& report);

  InodeTree& tree() { return tree_; }
  FetchEngine& engine() { return engine_; }
  ReplyTable& replies() { return replies_; }
  const FsOptions& options() const { return options_; }
  OpCounter& counter(Op op) { return ops_[static_cast<size_t>(op)]; }
  const std::array<OpCounter, static_cast<size_t>(Op::kCount)>& counters() const { return ops_; }
  std::atomic<uint64_t>& bytes_served() { return bytes_served_; }

 private:
  InodeTree tree_;
  FetchEngine& engine_;
  FsOptions options_;
  ReplyTable replies_;
  std::array<OpCounter, static_cast<size_t>(Op::kCount)> ops_;
  std::atomic<uint64_t> bytes_served_{0};
};

// The ops table; the session's userdata must be a LazyFs*.
const fuse_lowlevel_ops& lazyfs_ops();

}  // namespace lazyfs::fs
