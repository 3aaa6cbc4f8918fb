// Test-only observation points in the writing of a range map (by
// CacheFile::flush() and by a shrinking truncate_local()), so that the tests
// can prove the crash-safety order (data durable, then map replaced, then,
// for a shrink, the data file cut) and stop a process exactly between the
// steps. Null, and so free, in production.
#pragma once

namespace lazyfs::cache_hooks {

enum class FlushStep {
  kSnapshotTaken,  // maps serialised; nothing synced or written yet
  kDataSynced,     // fdatasync of the data file returned; old map still in place
  kMapWritten,     // new map renamed into place and its directory synced;
                   // a shrinking truncate has not cut the data file yet
};

// Called after each step when set. Set it before any flush runs and leave it
// alone while flushes may run.
extern void (*on_flush_step)(FlushStep step);

// When set, caches act as on a file system without extended attributes:
// every map goes to a .map file, as the tests of that store need. Set it
// before the caches it applies to are opened.
extern bool no_attribute_maps;

}  // namespace lazyfs::cache_hooks
