#include "lazyfs/lazyfs.h"

namespace lazyfs {

const char* version() {
  return LAZYFS_VERSION;
}

}  // namespace lazyfs
