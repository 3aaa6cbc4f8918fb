// A program embedding liblazyfs: reads one file of a checkpoint lazily, with
// no mount, then (with --mount DIR, as root) mounts the checkpoint and reads
// the same bytes through the mount. Built out of tree against an installed
// lazyfs by test/install/check-install.sh, with find_package and with
// pkg-config; docs/library.md shows this file.
//
//   consumer IMGDIR SOURCE_URI CACHE_DIR PATH [--mount DIR]
#include <lazyfs/filesystem.h>
#include <lazyfs/lazyfs.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5 && argc != 7) {
    std::fprintf(stderr, "usage: consumer IMGDIR SOURCE_URI CACHE_DIR PATH [--mount DIR]\n");
    return 2;
  }
  const std::string path = argv[4];

  // Log through our own sink instead of stderr.
  lazyfs::log::set_sink(
      [](lazyfs::log::Level level, std::string_view subsystem, std::string_view message) {
        if (level >= lazyfs::log::Level::kWarn) {
          std::fprintf(stderr, "[lazyfs %.*s] %.*s\n", static_cast<int>(subsystem.size()),
                       subsystem.data(), static_cast<int>(message.size()), message.data());
        }
      });

  // The checkpoint's catalog: which files a restore opens.
  lazyfs::Catalog catalog = lazyfs::Catalog::load(argv[1]);
  std::printf("lazyfs %s: checkpoint %s serves %zu files, %llu bytes\n", lazyfs::version(),
              catalog.identity().substr(0, 12).c_str(), catalog.files().size(),
              static_cast<unsigned long long>(catalog.total_bytes()));

  // Where the bytes come from: sftp://..., http(s)://..., file:///..., or our own Source.
  lazyfs::Status status;
  std::shared_ptr<lazyfs::Source> source = lazyfs::open_source(argv[2], {}, status);
  if (!source) {
    std::fprintf(stderr, "consumer: %s\n", status.message().c_str());
    return 1;
  }

  // Lazy reads without a mount: only the blocks asked for are fetched.
  lazyfs::ReaderOptions reader_options;
  reader_options.cache_dir = argv[3];
  auto reader = lazyfs::LazyReader::open(catalog, source, reader_options, status);
  if (!reader) {
    std::fprintf(stderr, "consumer: %s\n", status.message().c_str());
    return 1;
  }
  std::vector<std::byte> lazy(4096);
  size_t got = 0;
  status = reader->read(path, 1 << 20, lazy, got);
  if (!status.ok() || got != lazy.size()) {
    std::fprintf(stderr, "consumer: read %s: %s\n", path.c_str(), status.message().c_str());
    return 1;
  }
  std::printf("read %zu bytes of %s lazily; fetched %llu bytes from %s\n", got, path.c_str(),
              static_cast<unsigned long long>(reader->engine().stats().fetched_bytes),
              source->describe().c_str());
  reader.reset();

  if (argc == 7) {
    // The same checkpoint mounted, served on a background thread.
    lazyfs::FilesystemOptions fs_options;
    fs_options.cache_dir = std::string(argv[3]) + "/mount";
    auto fs = lazyfs::Filesystem::create(catalog, source, fs_options, status);
    if (!fs || !(status = fs->mount(argv[6])).ok() || !(status = fs->start()).ok()) {
      std::fprintf(stderr, "consumer: mount: %s\n", status.message().c_str());
      return 1;
    }
    std::ifstream in(std::string(argv[6]) + path, std::ios::binary);
    std::vector<char> mounted(lazy.size());
    in.seekg(1 << 20);
    in.read(mounted.data(), static_cast<std::streamsize>(mounted.size()));
    const bool same = in && std::equal(mounted.begin(), mounted.end(),
                                       reinterpret_cast<const char*>(lazy.data()));
    in.close();
    fs->stop();
    std::printf("read the same bytes through the mount: %s\n", same ? "yes" : "NO");
    if (!same) return 1;
  }
  return 0;
}
