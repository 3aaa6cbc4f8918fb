#include "fuse_fs.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <fmt/core.h>
#include <cerrno>
#include <cstring>
#include <new>

#include "lazyfs/log.h"

namespace lazyfs::fs {

uint64_t ReplyTable::park(fuse_req_t req) {
  std::lock_guard lock(mutex_);
  uint64_t id = next_id_++;
  parked_.emplace(id, req);
  return id;
}

fuse_req_t ReplyTable::claim(uint64_t id) {
  std::lock_guard lock(mutex_);
  auto it = parked_.find(id);
  if (it == parked_.end()) return nullptr;
  fuse_req_t req = it->second;
  parked_.erase(it);
  return req;
}

size_t ReplyTable::parked() const {
  std::lock_guard lock(mutex_);
  return parked_.size();
}

const char* op_name(Op op) {
  static constexpr const char* kNames[] = {"lookup", "getattr", "setattr", "readdir", "open",
                                           "read",   "write",   "fsync",   "create",  "unlink",
                                           "rename", "mkdir",   "other"};
  return kNames[static_cast<size_t>(op)];
}

LazyFs::LazyFs(const Catalog& catalog, FetchEngine& engine, FsOptions options, bool compat_names,
               BuildReport& report)
    : tree_(catalog, compat_names, report), engine_(engine), options_(std::move(options)) {}

namespace {

LazyFs& fs_of(fuse_req_t req) {
  return *static_cast<LazyFs*>(fuse_req_userdata(req));
}

void on_interrupt(fuse_req_t req, void* data) {
  auto id = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(data));
  log::debug("fuse", "interrupt id={}", id);
  if (fuse_req_t parked = fs_of(req).replies().claim(id)) fuse_reply_err(parked, EINTR);
}

// A request answered later. Owned by the completion that will answer it
// (shared, because std::function needs copyable captures); answers EIO if it
// is dropped unanswered.
class Parked {
 public:
  Parked(LazyFs& fs, fuse_req_t req, Op op, bool interruptible)
      : fs_(fs), id_(fs.replies().park(req)) {
    ++fs.counter(op).parked;
    if (interruptible) {
      fuse_req_interrupt_func(req, on_interrupt,
                              reinterpret_cast<void*>(static_cast<uintptr_t>(id_)));
    }
  }
  ~Parked() {
    if (fuse_req_t req = fs_.replies().claim(id_)) fuse_reply_err(req, EIO);
  }
  Parked(const Parked&) = delete;
  Parked& operator=(const Parked&) = delete;

  // The request, if nobody answered it yet; the caller must answer it.
  fuse_req_t take() { return fs_.replies().claim(id_); }
  LazyFs& fs() { return fs_; }

 private:
  LazyFs& fs_;
  uint64_t id_;
};

void reply_err(LazyFs& fs, Op op, fuse_req_t req, int err) {
  if (err != 0) ++fs.counter(op).errors;
  fuse_reply_err(req, err);
}

// Runs an op body; any exception becomes an errno reply. Bodies reply last,
// so an exception always comes before the reply.
template <typename Body>
void guarded(fuse_req_t req, Op op, Body&& body) {
  LazyFs& fs = fs_of(req);
  ++fs.counter(op).calls;
  try {
    body(fs);
  } catch (const std::bad_alloc&) {
    reply_err(fs, op, req, ENOMEM);
  } catch (const std::exception& e) {
    log::error("fuse", "op={} exception=\"{}\"", op_name(op), e.what());
    reply_err(fs, op, req, EIO);
  } catch (...) {
    reply_err(fs, op, req, EIO);
  }
}

// Runs `op` on a local file's descriptor (reopened if it was closed) and
// returns its errno, or the reopen's.
template <typename Op>
int with_local_fd(const NodeView& v, Op op) {
  int err;
  const auto fd = v.local->fd(err);
  return fd ? op(fd->get()) : err;
}

uint64_t node_size(LazyFs& fs, const NodeView& v) {
  switch (v.kind) {
    case Node::Kind::kDir:
      return 4096;
    case Node::Kind::kLocal: {
      int err;
      const auto fd = v.local->fd(err);
      struct stat st;
      return fd && ::fstat(fd->get(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
    }
    case Node::Kind::kServed:
      return fs.engine().known_size(v.file_id).value_or(0);
  }
  return 0;
}

struct stat make_attr(LazyFs& fs, const NodeView& v) {
  struct stat st {};
  st.st_ino = v.ino;
  st.st_mode = v.mode;
  st.st_nlink = v.nlink;
  st.st_uid = v.uid;
  st.st_gid = v.gid;
  st.st_size = static_cast<off_t>(node_size(fs, v));
  st.st_blksize = static_cast<blksize_t>(fs.engine().options().block_size);
  st.st_blocks = (st.st_size + 511) / 512;
  st.st_atim = v.atime;
  st.st_mtim = v.mtime;
  st.st_ctim = v.ctime;
  return st;
}

// Whether the kernel may cache what we say about v: not for a served file
// whose owner and times are still unknown (its source could not be asked).
double timeout_for(LazyFs& fs, const NodeView& v) {
  return v.kind == Node::Kind::kServed && !v.owner_set ? 0.0 : fs.options().attr_timeout;
}

// Runs `then` once a served file's attributes are known (validated against
// the source once, then seeded into the tree); at once for anything else.
// A stale file still gets its checkpoint attributes (its reads fail); a
// source that cannot be asked gives `then` the error.
template <typename Then>
void with_attrs(LazyFs& fs, const NodeView& v, Then then) {
  if (v.kind != Node::Kind::kServed || v.owner_set) {
    then(Status{}, v);
    return;
  }
  fs.engine().file_info(v.file_id, [&fs, v, then](const Status& st, const FileInfo& info) mutable {
    if (st.ok()) {
      fs.tree().seed_from_source(v.ino, info.source.uid, info.source.gid, info.source.atime,
                                 info.source.mtime);
      auto fresh = fs.tree().get(v.ino);
      then(Status{}, fresh ? *fresh : v);
    } else if (!st.retryable()) {
      then(Status{}, v);  // stale: show what the checkpoint says
    } else {
      then(st, v);
    }
  });
}

void reply_entry(LazyFs& fs, Op op, fuse_req_t req, const NodeView& v) {
  if (!fs.tree().add_lookup(v.ino)) return reply_err(fs, op, req, ENOENT);
  fuse_entry_param e{};
  e.ino = v.ino;
  e.generation = 1;
  e.attr = make_attr(fs, v);
  e.attr_timeout = e.entry_timeout = timeout_for(fs, v);
  if (fuse_reply_entry(req, &e) != 0) fs.tree().forget(v.ino, 1);  // the kernel never saw it
}

void lfs_init(void* userdata, fuse_conn_info* conn) {
  auto& fs = *static_cast<LazyFs*>(userdata);
  conn->max_write = 1 << 20;
  // The kernel's read-ahead, and its read-around on an mmap page fault, ask
  // for this much at once; see FsOptions::max_readahead.
  conn->max_readahead = fs.options().max_readahead;
  for (unsigned cap : {unsigned{FUSE_CAP_SPLICE_WRITE}, unsigned{FUSE_CAP_SPLICE_MOVE},
                       unsigned{FUSE_CAP_ASYNC_READ}, unsigned{FUSE_CAP_READDIRPLUS},
                       unsigned{FUSE_CAP_PARALLEL_DIROPS}}) {
    if (conn->capable & cap) conn->want |= cap;
  }
  // Locks stay in the kernel (the restored process's flock/fcntl locks work
  // locally); writes go straight to us so local bytes are never stale; and
  // direct I/O stays synchronous, so a signal can interrupt a parked direct
  // read (with async DIO the kernel waits for the answer uninterruptibly).
  conn->want &= ~unsigned{FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS | FUSE_CAP_WRITEBACK_CACHE |
                          FUSE_CAP_ASYNC_DIO};
}

void lfs_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guarded(req, Op::kLookup, [&](LazyFs& fs) {
    int err = 0;
    auto v = fs.tree().lookup(parent, name, err);
    if (!v) return reply_err(fs, Op::kLookup, req, err);
    auto parked = std::make_shared<Parked>(fs, req, Op::kLookup, false);
    with_attrs(fs, *v, [parked](const Status& st, const NodeView& view) {
      fuse_req_t r = parked->take();
      if (!r) return;
      if (!st.ok()) return reply_err(parked->fs(), Op::kLookup, r, st.errnum());
      reply_entry(parked->fs(), Op::kLookup, r, view);
    });
  });
}

void lfs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  fs_of(req).tree().forget(ino, nlookup);
  fuse_reply_none(req);
}

void lfs_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; ++i) fs_of(req).tree().forget(forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

void lfs_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  guarded(req, Op::kGetattr, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kGetattr, req, ESTALE);
    auto parked = std::make_shared<Parked>(fs, req, Op::kGetattr, false);
    with_attrs(fs, *v, [parked](const Status& st, const NodeView& view) {
      fuse_req_t r = parked->take();
      if (!r) return;
      LazyFs& f = parked->fs();
      if (!st.ok()) return reply_err(f, Op::kGetattr, r, st.errnum());
      auto attr = make_attr(f, view);
      fuse_reply_attr(r, &attr, timeout_for(f, view));
    });
  });
}

// Runs `then` with the served file's cache once the file is validated.
template <typename Then>
void with_cache(LazyFs& fs, const NodeView& v, Then then) {
  if (CacheFile* c = fs.engine().cache_file(v.file_id)) return then(Status{}, c);
  fs.engine().file_info(v.file_id, [&fs, v, then](const Status& st, const FileInfo&) mutable {
    CacheFile* c = st.ok() ? fs.engine().cache_file(v.file_id) : nullptr;
    then(c ? Status{} : (st.ok() ? Status::permanent(EIO, "no cache") : st), c);
  });
}

void lfs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
  guarded(req, Op::kSetattr, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, Op::kSetattr, req, EROFS);
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kSetattr, req, ESTALE);
    auto parked = std::make_shared<Parked>(fs, req, Op::kSetattr, false);
    const struct stat wanted = *attr;
    // Owner and times of a served file start from the source's: validate
    // first, so a chmod does not pin made-up values.
    with_attrs(fs, *v, [parked, wanted, to_set](const Status& st, const NodeView& view) {
      LazyFs& f = parked->fs();
      auto finish = [parked, wanted, to_set, ino = view.ino](int err) {
        fuse_req_t r = parked->take();
        if (!r) return;
        LazyFs& f2 = parked->fs();
        NodeView after;
        if (!err) err = f2.tree().set_attrs(ino, wanted, to_set & ~FUSE_SET_ATTR_SIZE, after);
        if (err) return reply_err(f2, Op::kSetattr, r, err);
        if (to_set & FUSE_SET_ATTR_SIZE) f2.tree().touch_mtime(ino);
        auto fresh = f2.tree().get(ino);
        auto a = make_attr(f2, fresh ? *fresh : after);
        fuse_reply_attr(r, &a, f2.options().attr_timeout);
      };
      if (!st.ok()) return finish(st.errnum());
      if (!(to_set & FUSE_SET_ATTR_SIZE)) return finish(0);
      const auto size = static_cast<uint64_t>(wanted.st_size);
      switch (view.kind) {
        case Node::Kind::kDir:
          return finish(EISDIR);
        case Node::Kind::kLocal:
          return finish(with_local_fd(view, [size](int fd) {
            return ::ftruncate(fd, static_cast<off_t>(size)) == 0 ? 0 : errno;
          }));
        case Node::Kind::kServed:
          with_cache(f, view, [finish, size](const Status& cst, CacheFile* cache) {
            if (!cst.ok()) return finish(cst.errnum());
            auto tst = cache->truncate_local(size);
            finish(tst.ok() ? 0 : tst.errnum());
          });
          return;
      }
    });
  });
}

void lfs_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  guarded(req, Op::kOther, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kOther, req, ESTALE);
    if (v->kind != Node::Kind::kDir) return reply_err(fs, Op::kOther, req, ENOTDIR);
    fi->cache_readdir = 0;
    fuse_reply_open(req, fi);
  });
}

void lfs_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info*) {
  fuse_reply_err(req, 0);
}

void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus) {
  guarded(req, Op::kReaddir, [&](LazyFs& fs) {
    std::vector<InodeTree::DirEntry> entries;
    if (!fs.tree().list(ino, entries)) return reply_err(fs, Op::kReaddir, req, ESTALE);
    std::vector<char> buf(size);
    size_t used = 0;
    for (size_t i = static_cast<size_t>(off); i < entries.size(); ++i) {
      const auto& e = entries[i];
      const auto next = static_cast<off_t>(i + 1);
      size_t need;
      if (!plus) {
        struct stat st {};
        st.st_ino = e.ino;
        st.st_mode = e.mode;
        need = fuse_add_direntry(req, buf.data() + used, size - used, e.name.c_str(), &st, next);
      } else {
        fuse_entry_param p{};
        const bool dot = e.name == "." || e.name == "..";
        std::optional<NodeView> v;
        if (!dot) v = fs.tree().get(e.ino);
        if (v) {
          p.ino = v->ino;
          p.generation = 1;
          p.attr = make_attr(fs, *v);
          p.attr_timeout = p.entry_timeout = timeout_for(fs, *v);
        } else {
          p.attr.st_ino = e.ino;  // the kernel makes no entry for these
          p.attr.st_mode = e.mode;
        }
        need =
            fuse_add_direntry_plus(req, buf.data() + used, size - used, e.name.c_str(), &p, next);
        if (need <= size - used && v && !fs.tree().add_lookup(v->ino)) continue;
      }
      if (need > size - used) break;
      used += need;
    }
    fuse_reply_buf(req, buf.data(), used);
  });
}

void lfs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  do_readdir(req, ino, size, off, false);
}

void lfs_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  do_readdir(req, ino, size, off, true);
}

void lfs_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  guarded(req, Op::kOpen, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kOpen, req, ESTALE);
    if (v->kind == Node::Kind::kDir) return reply_err(fs, Op::kOpen, req, EISDIR);
    const bool writes = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
    if (writes && fs.options().read_only) return reply_err(fs, Op::kOpen, req, EROFS);
    // The kernel keeps what it cached: only this mount changes these bytes.
    fi->keep_cache = 1;
    fi->noflush = 1;
    if (v->kind == Node::Kind::kLocal) return (void)fuse_reply_open(req, fi);
    // A served file is validated before its first open, so a stale one fails
    // here, where the restore sees it, rather than at its first read.
    auto parked = std::make_shared<Parked>(fs, req, Op::kOpen, true);
    fuse_file_info copy = *fi;
    with_cache(fs, *v, [parked, copy](const Status& st, CacheFile*) mutable {
      fuse_req_t r = parked->take();
      if (!r) return;
      if (!st.ok()) return reply_err(parked->fs(), Op::kOpen, r, st.errnum());
      fuse_reply_open(r, &copy);
    });
  });
}

void reply_from_fd(LazyFs& fs, fuse_req_t req, int fd, uint64_t off, uint64_t len) {
  fuse_bufvec buf = FUSE_BUFVEC_INIT(static_cast<size_t>(len));
  buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  buf.buf[0].fd = fd;
  buf.buf[0].pos = static_cast<off_t>(off);
  fs.bytes_served() += len;
  fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

void lfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  guarded(req, Op::kRead, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kRead, req, ESTALE);
    const auto offset = static_cast<uint64_t>(off);
    if (v->kind == Node::Kind::kLocal) {
      int err;
      const auto fd = v->local->fd(err);
      if (!fd) return reply_err(fs, Op::kRead, req, err);
      return reply_from_fd(fs, req, fd->get(), offset, size);
    }
    if (v->kind != Node::Kind::kServed) return reply_err(fs, Op::kRead, req, EISDIR);
    auto parked = std::make_shared<Parked>(fs, req, Op::kRead, true);
    const uint32_t id = v->file_id;
    if (fs.options().trace) fs.options().trace->record(v->source_path, offset, size);
    fs.engine().request(
        id, offset, size, Priority::kDemand, [parked, id, offset, size](const Status& st) {
          fuse_req_t r = parked->take();
          if (!r) return;
          LazyFs& f = parked->fs();
          if (!st.ok()) return reply_err(f, Op::kRead, r, st.errnum());
          CacheFile* cache = f.engine().cache_file(id);
          const uint64_t fsize = cache->size();
          const uint64_t len = offset >= fsize ? 0 : std::min<uint64_t>(size, fsize - offset);
          const SharedFd fd = cache->fd();
          if (!fd) return reply_err(f, Op::kRead, r, EIO);
          reply_from_fd(f, r, fd->get(), offset, len);
        });
  });
}

// Writes `data` into a served file once the blocks it covers only in part are
// present (a partial write into a missing block would otherwise leave the
// rest of that block unfetchable: the block would count as local).
void write_served(std::shared_ptr<Parked> parked, const NodeView& v, CacheFile* cache,
                  uint64_t offset, std::shared_ptr<std::vector<std::byte>> data) {
  LazyFs& fs = parked->fs();
  const uint64_t bs = fs.engine().options().block_size;
  const uint64_t end = offset + data->size();
  const uint64_t size = cache->source_size();
  std::vector<Range> partial;
  if (offset % bs && offset < size) partial.push_back({offset / bs * bs, offset});
  if (end % bs && end < size) partial.push_back({end, std::min(size, (end / bs + 1) * bs)});
  auto finish = [parked, cache, offset, data, ino = v.ino](const Status& st) {
    fuse_req_t r = parked->take();
    if (!r) return;
    LazyFs& f = parked->fs();
    if (!st.ok()) return reply_err(f, Op::kWrite, r, st.errnum());
    auto wst = cache->write_local(offset, *data);
    if (!wst.ok()) return reply_err(f, Op::kWrite, r, wst.errnum());
    f.tree().touch_mtime(ino);
    fuse_reply_write(r, data->size());
  };
  std::vector<Range> need;
  for (Range p : partial) {
    if (!cache->present(p)) need.push_back(p);
  }
  if (need.empty()) return finish({});
  // Join the (at most two) block fetches; the first error wins.
  struct Join {
    std::mutex mutex;
    size_t left;
    Status status;
  };
  auto join = std::make_shared<Join>();
  join->left = need.size();
  for (Range p : need) {
    fs.engine().request(v.file_id, p.begin, p.size(), Priority::kDemand,
                        [join, finish](const Status& st) {
                          std::unique_lock lock(join->mutex);
                          if (!st.ok() && join->status.ok()) join->status = st;
                          if (--join->left > 0) return;
                          auto result = join->status;
                          lock.unlock();
                          finish(result);
                        });
  }
}

void lfs_write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
               fuse_file_info*) {
  guarded(req, Op::kWrite, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, Op::kWrite, req, EROFS);
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kWrite, req, ESTALE);
    const auto offset = static_cast<uint64_t>(off);
    if (v->kind == Node::Kind::kLocal) {
      if (int err = with_local_fd(
              *v, [&](int fd) { return pwrite_all(fd, buf, size, offset).value(); })) {
        return reply_err(fs, Op::kWrite, req, err);
      }
      fs.tree().touch_mtime(ino);
      return (void)fuse_reply_write(req, size);
    }
    if (v->kind != Node::Kind::kServed) return reply_err(fs, Op::kWrite, req, EISDIR);
    auto data = std::make_shared<std::vector<std::byte>>(size);
    std::memcpy(data->data(), buf, size);
    auto parked = std::make_shared<Parked>(fs, req, Op::kWrite, false);
    with_cache(fs, *v, [parked, view = *v, offset, data](const Status& st, CacheFile* cache) {
      if (!st.ok()) {
        if (fuse_req_t r = parked->take()) reply_err(parked->fs(), Op::kWrite, r, st.errnum());
        return;
      }
      write_served(parked, view, cache, offset, data);
    });
  });
}

void lfs_flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) {
  fuse_reply_err(req, 0);
}

void lfs_release(fuse_req_t req, fuse_ino_t, fuse_file_info*) {
  fuse_reply_err(req, 0);
}

void lfs_fsync(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  guarded(req, Op::kFsync, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kFsync, req, ESTALE);
    int err = 0;
    if (v->kind == Node::Kind::kLocal) {
      err = with_local_fd(*v, [](int fd) { return ::fdatasync(fd) == 0 ? 0 : errno; });
    } else if (v->kind == Node::Kind::kServed) {
      if (CacheFile* c = fs.engine().cache_file(v->file_id)) {
        auto st = c->flush();
        if (!st.ok()) err = st.errnum();
      }
    }
    reply_err(fs, Op::kFsync, req, err);
  });
}

void lfs_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                   fuse_file_info*) {
  guarded(req, Op::kOther, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, Op::kOther, req, EROFS);
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kOther, req, ESTALE);
    if (v->kind == Node::Kind::kLocal) {
      return reply_err(fs, Op::kOther, req, with_local_fd(*v, [&](int fd) {
                         return ::fallocate(fd, mode, off, len) == 0 ? 0 : errno;
                       }));
    }
    if (v->kind != Node::Kind::kServed) return reply_err(fs, Op::kOther, req, EISDIR);
    // Reserving space changes no byte; growing the file is a local extend.
    if (mode & ~FALLOC_FL_KEEP_SIZE) return reply_err(fs, Op::kOther, req, EOPNOTSUPP);
    const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
    const auto end = static_cast<uint64_t>(off) + static_cast<uint64_t>(len);
    auto parked = std::make_shared<Parked>(fs, req, Op::kOther, false);
    with_cache(fs, *v, [parked, keep_size, end](const Status& st, CacheFile* cache) {
      fuse_req_t r = parked->take();
      if (!r) return;
      int err = st.ok() ? 0 : st.errnum();
      if (!err && !keep_size && end > cache->size()) {
        auto tst = cache->truncate_local(end);
        if (!tst.ok()) err = tst.errnum();
      }
      reply_err(parked->fs(), Op::kOther, r, err);
    });
  });
}

void lfs_statfs(fuse_req_t req, fuse_ino_t) {
  guarded(req, Op::kOther, [&](LazyFs& fs) {
    struct statvfs st {};
    if (::statvfs(fs.options().local_files->dir().c_str(), &st) != 0) {
      return reply_err(fs, Op::kOther, req, errno);
    }
    st.f_files = fs.tree().node_count();
    st.f_ffree = 1u << 20;
    st.f_namemax = NAME_MAX;
    fuse_reply_statfs(req, &st);
  });
}

// user.lazyfs.* attributes: a served file's progress, for scripts and ls -l@.
std::vector<std::pair<std::string, std::string>> progress_xattrs(LazyFs& fs, const NodeView& v) {
  if (v.kind != Node::Kind::kServed) return {};
  const FileStats s = fs.engine().file_stat(v.file_id);
  const uint64_t size = s.size.value_or(0);
  return {{"user.lazyfs.source_path", v.source_path},
          {"user.lazyfs.size", s.size ? std::to_string(size) : ""},
          {"user.lazyfs.present_bytes", std::to_string(s.present_bytes)},
          {"user.lazyfs.fetched_bytes", std::to_string(s.fetched_bytes)},
          {"user.lazyfs.local_bytes", std::to_string(s.local_bytes)},
          {"user.lazyfs.complete", s.size && s.present_bytes >= size && s.durable ? "1" : "0"},
          {"user.lazyfs.stale", s.stale ? "1" : "0"}};
}

void reply_xattr_value(fuse_req_t req, const std::string& value, size_t size) {
  if (size == 0) return (void)fuse_reply_xattr(req, value.size());
  if (size < value.size()) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, value.data(), value.size());
}

void lfs_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  guarded(req, Op::kOther, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kOther, req, ESTALE);
    for (const auto& [key, value] : progress_xattrs(fs, *v)) {
      if (key == name) return reply_xattr_value(req, value, size);
    }
    fuse_reply_err(req, ENODATA);
  });
}

void lfs_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  guarded(req, Op::kOther, [&](LazyFs& fs) {
    auto v = fs.tree().get(ino);
    if (!v) return reply_err(fs, Op::kOther, req, ESTALE);
    std::string names;
    for (const auto& kv : progress_xattrs(fs, *v)) names += kv.first + '\0';
    reply_xattr_value(req, names, size);
  });
}

void lfs_setxattr(fuse_req_t req, fuse_ino_t, const char*, const char*, size_t, int) {
  fuse_reply_err(req, ENOTSUP);
}

void lfs_removexattr(fuse_req_t req, fuse_ino_t, const char*) {
  fuse_reply_err(req, ENOTSUP);
}

void make_and_reply(fuse_req_t req, Op op, fuse_ino_t parent, const char* name, mode_t mode,
                    fuse_file_info* fi) {
  guarded(req, op, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, op, req, EROFS);
    const fuse_ctx* ctx = fuse_req_ctx(req);
    const bool dir = S_ISDIR(mode);
    if (!dir && !S_ISREG(mode)) return reply_err(fs, op, req, EPERM);  // no devices, fifos
    std::shared_ptr<LocalFile> local;
    if (!dir) {
      int err;
      local = fs.options().local_files->create(err);
      if (!local) return reply_err(fs, op, req, err);
    }
    NodeView v;
    int err = fs.tree().make_node(parent, name, dir ? Node::Kind::kDir : Node::Kind::kLocal,
                                  (mode & S_IFMT) | (mode & 07777 & ~ctx->umask), ctx->uid,
                                  ctx->gid, local, v);
    if (err) return reply_err(fs, op, req, err);
    fuse_entry_param e{};
    e.ino = v.ino;
    e.generation = 1;
    e.attr = make_attr(fs, v);
    e.attr_timeout = e.entry_timeout = fs.options().attr_timeout;
    if (fi) {
      fi->keep_cache = 1;
      if (fuse_reply_create(req, &e, fi) != 0) fs.tree().forget(v.ino, 1);
    } else if (fuse_reply_entry(req, &e) != 0) {
      fs.tree().forget(v.ino, 1);
    }
  });
}

void lfs_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                fuse_file_info* fi) {
  make_and_reply(req, Op::kCreate, parent, name, S_IFREG | (mode & 07777), fi);
}

void lfs_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t) {
  make_and_reply(req, Op::kCreate, parent, name, mode, nullptr);
}

void lfs_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  make_and_reply(req, Op::kMkdir, parent, name, S_IFDIR | (mode & 07777), nullptr);
}

void lfs_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guarded(req, Op::kUnlink, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, Op::kUnlink, req, EROFS);
    reply_err(fs, Op::kUnlink, req, fs.tree().unlink(parent, name, false));
  });
}

void lfs_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guarded(req, Op::kUnlink, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, Op::kUnlink, req, EROFS);
    reply_err(fs, Op::kUnlink, req, fs.tree().unlink(parent, name, true));
  });
}

void lfs_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                const char* newname, unsigned int flags) {
  guarded(req, Op::kRename, [&](LazyFs& fs) {
    if (fs.options().read_only) return reply_err(fs, Op::kRename, req, EROFS);
    reply_err(fs, Op::kRename, req, fs.tree().rename(parent, name, newparent, newname, flags));
  });
}

fuse_lowlevel_ops make_ops() {
  fuse_lowlevel_ops ops{};
  ops.init = lfs_init;
  ops.lookup = lfs_lookup;
  ops.forget = lfs_forget;
  ops.forget_multi = lfs_forget_multi;
  ops.getattr = lfs_getattr;
  ops.setattr = lfs_setattr;
  ops.opendir = lfs_opendir;
  ops.readdir = lfs_readdir;
  ops.readdirplus = lfs_readdirplus;
  ops.releasedir = lfs_releasedir;
  ops.open = lfs_open;
  ops.read = lfs_read;
  ops.write = lfs_write;
  ops.flush = lfs_flush;
  ops.release = lfs_release;
  ops.fsync = lfs_fsync;
  ops.fallocate = lfs_fallocate;
  ops.statfs = lfs_statfs;
  ops.getxattr = lfs_getxattr;
  ops.listxattr = lfs_listxattr;
  ops.setxattr = lfs_setxattr;
  ops.removexattr = lfs_removexattr;
  ops.create = lfs_create;
  ops.mknod = lfs_mknod;
  ops.mkdir = lfs_mkdir;
  ops.unlink = lfs_unlink;
  ops.rmdir = lfs_rmdir;
  ops.rename = lfs_rename;
  return ops;
}

}  // namespace

const fuse_lowlevel_ops& lazyfs_ops() {
  static const fuse_lowlevel_ops ops = make_ops();
  return ops;
}

}  // namespace lazyfs::fs
