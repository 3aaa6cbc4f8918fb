#include "inode_tree.h"

#include <fmt/core.h>

#include <cerrno>
#include <mutex>

#include "lazyfs/log.h"
#include "lazyfs/paths.h"

namespace lazyfs::fs {

namespace {

constexpr uint32_t kMadeUpDirMode = S_IFDIR | 0755;

std::string flat_name(const std::string& path) {
  std::string flat = path.substr(1);
  for (auto& c : flat) {
    if (c == '/') c = '.';
  }
  return flat;
}

}  // namespace

InodeTree::InodeTree(const Catalog& catalog, bool compat_names, BuildReport& report) {
  ::clock_gettime(CLOCK_REALTIME, &mount_time_);
  std::unique_lock lock(mutex_);
  add_locked(Node::Kind::kDir, kMadeUpDirMode, FUSE_ROOT_ID).nlookup = 1;  // pinned root

  for (const auto& d : catalog.dirs()) {
    fuse_ino_t ino = ensure_dir_locked(d.path, report);
    if (ino != 0) find_locked(ino)->mode = d.mode;
  }
  served_.assign(catalog.files().size(), 0);
  for (uint32_t id = 0; id < catalog.files().size(); ++id) {
    const auto& f = catalog.files()[id];
    const auto slash = f.path.rfind('/');
    fuse_ino_t parent = ensure_dir_locked(slash == 0 ? "/" : f.path.substr(0, slash), report);
    const std::string name = f.path.substr(slash + 1);
    Node* p = parent ? find_locked(parent) : nullptr;
    if (!p || p->children.count(name)) {
      report.conflicts.push_back(f.path);
      continue;
    }
    Node& n = add_locked(Node::Kind::kServed, f.mode.value_or(S_IFREG | 0644), parent);
    n.file_id = id;
    n.source_path = f.path;
    p->children[name] = n.ino;
    served_[id] = n.ino;
  }
  if (compat_names) {
    Node* root = find_locked(FUSE_ROOT_ID);
    for (uint32_t id = 0; id < served_.size(); ++id) {
      if (!served_[id]) continue;
      const auto name = flat_name(catalog.files()[id].path);
      if (name.size() > NAME_MAX || root->children.count(name)) {
        report.compat_collisions.push_back(name);
        continue;
      }
      root->children[name] = served_[id];
      ++find_locked(served_[id])->nlink;
    }
  }
}

Node& InodeTree::add_locked(Node::Kind kind, uint32_t mode, fuse_ino_t parent) {
  auto n = std::make_unique<Node>();
  n->ino = next_ino_++;
  n->kind = kind;
  n->mode = mode;
  n->parent = parent;
  n->atime = n->mtime = n->ctime = mount_time_;
  n->nlink = kind == Node::Kind::kDir ? 2 : 1;
  Node& ref = *n;
  nodes_.emplace(ref.ino, std::move(n));
  return ref;
}

// The directory at `path`, made up (0755) where missing; 0 when a file is in
// the way.
fuse_ino_t InodeTree::ensure_dir_locked(const std::string& path, BuildReport& report) {
  fuse_ino_t ino = FUSE_ROOT_ID;
  for (auto comp : path_components(path)) {
    Node* dir = find_locked(ino);
    auto it = dir->children.find(std::string(comp));
    if (it == dir->children.end()) {
      Node& child = add_locked(Node::Kind::kDir, kMadeUpDirMode, ino);
      dir->children.emplace(std::string(comp), child.ino);
      ++dir->nlink;
      ino = child.ino;
    } else {
      Node* child = find_locked(it->second);
      if (child->kind != Node::Kind::kDir) {
        report.conflicts.push_back(path);
        return 0;
      }
      ino = child->ino;
    }
  }
  return ino;
}

Node* InodeTree::find_locked(fuse_ino_t ino) const {
  auto it = nodes_.find(ino);
  return it == nodes_.end() ? nullptr : it->second.get();
}

NodeView InodeTree::view_locked(const Node& n) const {
  NodeView v;
  v.ino = n.ino;
  v.kind = n.kind;
  v.mode = n.mode;
  v.uid = n.uid;
  v.gid = n.gid;
  v.atime = n.atime;
  v.mtime = n.mtime;
  v.ctime = n.ctime;
  v.owner_set = n.owner_set;
  v.times_set = n.times_set;
  v.nlink = n.nlink;
  v.file_id = n.file_id;
  v.source_path = n.source_path;
  v.local = n.local;
  v.children = n.children.size();
  return v;
}

std::optional<NodeView> InodeTree::get(fuse_ino_t ino) const {
  std::shared_lock lock(mutex_);
  const Node* n = find_locked(ino);
  if (!n) return std::nullopt;
  return view_locked(*n);
}

std::optional<NodeView> InodeTree::lookup(fuse_ino_t parent, const std::string& name,
                                          int& err) const {
  std::shared_lock lock(mutex_);
  Node* dir = find_locked(parent);
  if (!dir) {
    err = ESTALE;
    return std::nullopt;
  }
  if (dir->kind != Node::Kind::kDir) {
    err = ENOTDIR;
    return std::nullopt;
  }
  auto it = dir->children.find(name);
  if (it == dir->children.end()) {
    err = ENOENT;
    return std::nullopt;
  }
  err = 0;
  return view_locked(*find_locked(it->second));
}

bool InodeTree::add_lookup(fuse_ino_t ino) {
  std::unique_lock lock(mutex_);
  Node* n = find_locked(ino);
  if (!n) return false;
  ++n->nlookup;
  return true;
}

void InodeTree::seed_from_source(fuse_ino_t ino, uint32_t uid, uint32_t gid, int64_t atime,
                                 int64_t mtime) {
  std::unique_lock lock(mutex_);
  Node* n = find_locked(ino);
  if (!n) return;
  if (!n->owner_set) {
    n->uid = uid;
    n->gid = gid;
    n->owner_set = true;
  }
  if (!n->times_set) {
    n->atime = {static_cast<time_t>(atime), 0};
    n->mtime = {static_cast<time_t>(mtime), 0};
    n->ctime = n->mtime;
    n->times_set = true;
  }
}

void InodeTree::forget(fuse_ino_t ino, uint64_t count) {
  std::unique_lock lock(mutex_);
  Node* n = find_locked(ino);
  if (!n) return;
  if (count > n->nlookup) {
    // The kernel never forgets more than it was given: a bug here or there.
    log::error("fuse", "forget below zero ino={} nlookup={} forget={}", ino, n->nlookup, count);
    count = n->nlookup;
  }
  n->nlookup -= count;
  drop_if_unused_locked(*n);
}

void InodeTree::drop_if_unused_locked(Node& n) {
  if (n.ino == FUSE_ROOT_ID || n.nlookup > 0) return;
  const bool unnamed = n.kind == Node::Kind::kDir ? n.nlink <= 1 : n.nlink == 0;
  if (unnamed) nodes_.erase(n.ino);  // a local file's backing file goes with it
}

bool InodeTree::list(fuse_ino_t dir, std::vector<DirEntry>& out) const {
  std::shared_lock lock(mutex_);
  const Node* d = find_locked(dir);
  if (!d || d->kind != Node::Kind::kDir) return false;
  out.push_back({".", d->ino, d->mode});
  const Node* parent = find_locked(d->parent);
  out.push_back({"..", parent ? parent->ino : d->ino, parent ? parent->mode : d->mode});
  for (const auto& [name, ino] : d->children) out.push_back({name, ino, find_locked(ino)->mode});
  return true;
}

int InodeTree::make_node(fuse_ino_t parent, const std::string& name, Node::Kind kind, uint32_t mode,
                         uint32_t uid, uint32_t gid, std::shared_ptr<LocalFile> local,
                         NodeView& out) {
  if (name.empty() || name.size() > NAME_MAX || name.find('/') != std::string::npos ||
      name == "." || name == "..") {
    return EINVAL;
  }
  std::unique_lock lock(mutex_);
  Node* dir = find_locked(parent);
  if (!dir) return ESTALE;
  if (dir->kind != Node::Kind::kDir) return ENOTDIR;
  if (dir->children.count(name)) return EEXIST;
  Node& n = add_locked(kind, mode, parent);
  ::clock_gettime(CLOCK_REALTIME, &n.mtime);
  n.atime = n.ctime = n.mtime;
  n.uid = uid;
  n.gid = gid;
  n.owner_set = n.times_set = true;
  n.local = std::move(local);
  n.nlookup = 1;
  dir->children[name] = n.ino;
  if (kind == Node::Kind::kDir) ++dir->nlink;
  dir->mtime = dir->ctime = n.mtime;
  out = view_locked(n);
  return 0;
}

int InodeTree::unlink(fuse_ino_t parent, const std::string& name, bool want_dir) {
  std::unique_lock lock(mutex_);
  Node* dir = find_locked(parent);
  if (!dir) return ESTALE;
  auto it = dir->children.find(name);
  if (it == dir->children.end()) return ENOENT;
  Node* n = find_locked(it->second);
  const bool is_dir = n->kind == Node::Kind::kDir;
  if (want_dir && !is_dir) return ENOTDIR;
  if (!want_dir && is_dir) return EISDIR;
  if (is_dir && !n->children.empty()) return ENOTEMPTY;
  dir->children.erase(it);
  if (is_dir) {
    --dir->nlink;
    n->nlink = 0;
  } else {
    --n->nlink;
  }
  ::clock_gettime(CLOCK_REALTIME, &dir->mtime);
  dir->ctime = dir->mtime;
  n->ctime = dir->mtime;
  drop_if_unused_locked(*n);
  return 0;
}

int InodeTree::rename(fuse_ino_t parent, const std::string& name, fuse_ino_t new_parent,
                      const std::string& new_name, unsigned flags) {
  if (flags & ~static_cast<unsigned>(RENAME_NOREPLACE)) return EINVAL;  // no EXCHANGE
  if (new_name.empty() || new_name.size() > NAME_MAX || new_name == "." || new_name == "..") {
    return EINVAL;
  }
  std::unique_lock lock(mutex_);
  Node* from = find_locked(parent);
  Node* to = find_locked(new_parent);
  if (!from || !to) return ESTALE;
  if (to->kind != Node::Kind::kDir) return ENOTDIR;
  auto it = from->children.find(name);
  if (it == from->children.end()) return ENOENT;
  Node* n = find_locked(it->second);
  // A directory may not move into itself or below.
  for (Node* up = to; n->kind == Node::Kind::kDir; up = find_locked(up->parent)) {
    if (up == n) return EINVAL;
    if (up->ino == FUSE_ROOT_ID) break;
  }
  auto existing = to->children.find(new_name);
  if (existing != to->children.end()) {
    if (existing->second == n->ino) return 0;
    if (flags & RENAME_NOREPLACE) return EEXIST;
    Node* victim = find_locked(existing->second);
    const bool victim_dir = victim->kind == Node::Kind::kDir;
    if (victim_dir && n->kind != Node::Kind::kDir) return EISDIR;
    if (!victim_dir && n->kind == Node::Kind::kDir) return ENOTDIR;
    if (victim_dir && !victim->children.empty()) return ENOTEMPTY;
    to->children.erase(existing);
    if (victim_dir) {
      --to->nlink;
      victim->nlink = 0;
    } else {
      --victim->nlink;
    }
    drop_if_unused_locked(*victim);
  }
  from->children.erase(name);
  to->children[new_name] = n->ino;
  if (n->kind == Node::Kind::kDir && from != to) {
    --from->nlink;
    ++to->nlink;
    n->parent = to->ino;
  } else if (n->kind != Node::Kind::kDir) {
    n->parent = to->ino;
  }
  ::clock_gettime(CLOCK_REALTIME, &from->mtime);
  from->ctime = to->mtime = to->ctime = n->ctime = from->mtime;
  return 0;
}

int InodeTree::set_attrs(fuse_ino_t ino, const struct stat& attr, int to_set, NodeView& out) {
  std::unique_lock lock(mutex_);
  Node* n = find_locked(ino);
  if (!n) return ESTALE;
  timespec now;
  ::clock_gettime(CLOCK_REALTIME, &now);
  if (to_set & FUSE_SET_ATTR_MODE) {
    n->mode = (n->mode & S_IFMT) | (attr.st_mode & 07777);
  }
  if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    if (!n->owner_set && n->kind == Node::Kind::kServed) return EAGAIN;  // caller validates first
    if (to_set & FUSE_SET_ATTR_UID) n->uid = attr.st_uid;
    if (to_set & FUSE_SET_ATTR_GID) n->gid = attr.st_gid;
    n->owner_set = true;
  }
  if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                FUSE_SET_ATTR_MTIME_NOW)) {
    if (!n->times_set && n->kind == Node::Kind::kServed) return EAGAIN;
    if (to_set & FUSE_SET_ATTR_ATIME_NOW) n->atime = now;
    if (to_set & FUSE_SET_ATTR_ATIME) n->atime = attr.st_atim;
    if (to_set & FUSE_SET_ATTR_MTIME_NOW) n->mtime = now;
    if (to_set & FUSE_SET_ATTR_MTIME) n->mtime = attr.st_mtim;
    n->times_set = true;
  }
  n->ctime = now;
  out = view_locked(*n);
  return 0;
}

void InodeTree::touch_mtime(fuse_ino_t ino) {
  std::unique_lock lock(mutex_);
  Node* n = find_locked(ino);
  if (!n || (!n->times_set && n->kind == Node::Kind::kServed)) return;
  ::clock_gettime(CLOCK_REALTIME, &n->mtime);
  n->ctime = n->mtime;
}

size_t InodeTree::node_count() const {
  std::shared_lock lock(mutex_);
  return nodes_.size();
}

}  // namespace lazyfs::fs
