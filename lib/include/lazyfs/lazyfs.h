// liblazyfs: lazy restore of a CRIU checkpoint's files, for embedding.
//
//   Catalog::load(dir)          the files a restore of a checkpoint opens (catalog.h)
//   open_source(uri, ...)       where their bytes are: SFTP, file://, or your own Source
//   LazyReader                  read them lazily, without a mount (reader.h)
//   prepare_checkpoint(...)     point `criu restore` at a mount (prepare.h)
//   lazyfs::Filesystem          mount them (filesystem.h, in liblazyfs-fuse)
//
// Errors are Status values (errno + message) or exceptions (ImageError,
// std::runtime_error) from the calls that document them; nothing exits the
// process. There is no global state but the logger (log.h), whose sink an
// embedder may replace; several readers and file systems can run in one
// process.
#pragma once

#include "lazyfs/catalog.h"
#include "lazyfs/engine.h"
#include "lazyfs/http_source.h"
#include "lazyfs/image.h"
#include "lazyfs/log.h"
#include "lazyfs/open_source.h"
#include "lazyfs/prepare.h"
#include "lazyfs/reader.h"
#include "lazyfs/source.h"
#include "lazyfs/status.h"

namespace lazyfs {

// The library's version, "MAJOR.MINOR.PATCH".
const char* version();

}  // namespace lazyfs
