// lazyfs-make-source IMGDIR ROOT: writes every file the checkpoint in IMGDIR
// serves under ROOT (ROOT + path) with its recorded size and mode and the
// tests' known content, to stand for the source host's files in the demo.
#include <fmt/core.h>

#include "mount_fixture.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    fmt::print(stderr, "usage: lazyfs-make-source IMGDIR ROOT\n");
    return 2;
  }
  try {
    auto cat = lazyfs::Catalog::load(argv[1]);
    lazyfs::test::populate_source(cat, argv[2]);
    fmt::print("wrote {} files ({} bytes) under {}\n", cat.files().size(), cat.total_bytes(),
               argv[2]);
  } catch (const std::exception& e) {
    fmt::print(stderr, "lazyfs-make-source: {}\n", e.what());
    return 1;
  }
  return 0;
}
