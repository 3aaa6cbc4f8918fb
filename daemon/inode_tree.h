// InodeTree: the mounted namespace. Built from the catalog: every served file
// at its original absolute path, the parent directories made up (0755), the
// directories the checkpoint records with their recorded mode. Changes made
// by the restored process (create, rename, unlink, mkdir, rmdir, chmod, ...)
// are applied here, locally; nothing is ever written to the source.
//
// Inode numbers are stable for the life of the mount. Lookup counts follow
// libfuse's lowlevel rules: every reply that hands the kernel an entry adds
// one, forget subtracts; a node is dropped only when it has no names left and
// the kernel has forgotten it. The root is pinned.
//
// Lock order: InodeTree::mutex_ is taken before any engine or cache lock and
// is never held across a fuse_reply_* call or a wait.
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "lazyfs/catalog.h"
#include "local_files.h"

namespace lazyfs::fs {

inline constexpr uint32_t kNoFile = UINT32_MAX;

struct Node {
  enum class Kind { kDir, kServed, kLocal };

  fuse_ino_t ino = 0;
  Kind kind = Kind::kDir;
  uint32_t mode = 0;  // whole st_mode
  uint32_t uid = 0;
  uint32_t gid = 0;
  timespec atime{};
  timespec mtime{};
  timespec ctime{};
  // Served files: owner and times come from the source's stat until changed
  // here; false until then.
  bool owner_set = false;
  bool times_set = false;
  fuse_ino_t parent = 0;
  uint32_t nlink = 1;  // names that point at this node
  uint64_t nlookup = 0;
  std::map<std::string, fuse_ino_t> children;  // directories only
  uint32_t file_id = kNoFile;                  // kServed: the engine's (and catalog's) index
  std::string source_path;                     // kServed: the path on the source
  std::shared_ptr<LocalFile> local;            // kLocal: the backing file
};

// A copy of what getattr and friends need, taken under the lock.
struct NodeView {
  fuse_ino_t ino = 0;
  Node::Kind kind = Node::Kind::kDir;
  uint32_t mode = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  timespec atime{};
  timespec mtime{};
  timespec ctime{};
  bool owner_set = false;
  bool times_set = false;
  uint32_t nlink = 1;
  uint32_t file_id = kNoFile;
  std::string source_path;
  std::shared_ptr<LocalFile> local;
  size_t children = 0;
};

struct BuildReport {
  std::vector<std::string> conflicts;          // paths that could not be placed
  std::vector<std::string> compat_collisions;  // flat names already taken
};

class InodeTree {
 public:
  // `compat_names`: also show each served file at the root under the original
  // LazyFS flat name (path without the leading '/', every '/' turned to '.').
  InodeTree(const Catalog& catalog, bool compat_names, BuildReport& report);

  std::optional<NodeView> get(fuse_ino_t ino) const;
  // The child's view; nullopt with `err` (ENOENT, ENOTDIR, ESTALE) if none.
  // Adds no lookup: the caller does, right before it replies with the entry.
  std::optional<NodeView> lookup(fuse_ino_t parent, const std::string& name, int& err) const;
  // One more lookup for a reply that hands the kernel this entry; false if
  // the node is gone.
  bool add_lookup(fuse_ino_t ino);
  void forget(fuse_ino_t ino, uint64_t n);
  // Owner and times of a served file from the source's stat, unless they
  // were already set (by the source or locally).
  void seed_from_source(fuse_ino_t ino, uint32_t uid, uint32_t gid, int64_t atime, int64_t mtime);

  // Directory listing as (name, ino, mode) after "." and "..".
  struct DirEntry {
    std::string name;
    fuse_ino_t ino;
    uint32_t mode;
  };
  bool list(fuse_ino_t dir, std::vector<DirEntry>& out) const;

  // Local changes; each returns 0 or a positive errno.
  int make_node(fuse_ino_t parent, const std::string& name, Node::Kind kind, uint32_t mode,
                uint32_t uid, uint32_t gid, std::shared_ptr<LocalFile> local, NodeView& out);
  int unlink(fuse_ino_t parent, const std::string& name, bool dir);
  int rename(fuse_ino_t parent, const std::string& name, fuse_ino_t new_parent,
             const std::string& new_name, unsigned flags);
  // Applies the set fields of setattr (mode, owner, times); size is the caller's.
  int set_attrs(fuse_ino_t ino, const struct stat& attr, int to_set, NodeView& out);
  void touch_mtime(fuse_ino_t ino);

  size_t node_count() const;
  // Served file ino by catalog index.
  fuse_ino_t served_ino(uint32_t file_id) const { return served_.at(file_id); }

 private:
  Node* find_locked(fuse_ino_t ino) const;
  Node& add_locked(Node::Kind kind, uint32_t mode, fuse_ino_t parent);
  fuse_ino_t ensure_dir_locked(const std::string& path, BuildReport& report);
  NodeView view_locked(const Node& n) const;
  void drop_if_unused_locked(Node& n);

  mutable std::shared_mutex mutex_;
  std::unordered_map<fuse_ino_t, std::unique_ptr<Node>> nodes_;  // guarded by mutex_
  fuse_ino_t next_ino_ = FUSE_ROOT_ID;                           // guarded by mutex_
  std::vector<fuse_ino_t> served_;  // by file id; fixed after construction
  timespec mount_time_{};
};

}  // namespace lazyfs::fs
