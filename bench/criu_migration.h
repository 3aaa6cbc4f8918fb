// --criu: real migrations instead of the workload run in place. For each
// scenario a workload process (--hold) opens and maps the files at
// VIEW + path, where VIEW is a bind mount of the source tree standing for the
// source host's file system, and is dumped with `criu dump`. Then VIEW is
// unmounted: the "restore host" no longer has the files. Each method makes
// them reachable again (an eager copy into VIEW, sshfs mounted at VIEW, or
// lazyfs mounted elsewhere with the dump prepared to open through it) and
// `criu restore` brings the process back, which reads its files through the
// descriptors CRIU reopened.
//
// Written to the letter of CRIU's command line but never run on the machine
// it was written on (no working CRIU there): see docs/benchmarks.md.
#pragma once

#include <filesystem>
#include <string>

#include "methods.h"

namespace lazyfs::bench {

// Runs `criu --version`; returns its first line, or throws saying the binary
// does not run.
std::string check_criu(const std::filesystem::path& criu);

class CriuMigration {
 public:
  // Sets up VIEW (a bind mount of `source_root`) under `dir`.
  CriuMigration(std::filesystem::path criu, const std::filesystem::path& dir,
                const std::filesystem::path& source_root, const std::filesystem::path& bin_dir);
  ~CriuMigration();
  CriuMigration(const CriuMigration&) = delete;
  CriuMigration& operator=(const CriuMigration&) = delete;

  // Starts the holding workload for `p`'s scenario and dumps it; fills the
  // CRIU fields of `p` (and its checkpoint: the dump directory).
  void dump(PreparedScenario& p);
  // Unmounts VIEW once every scenario is dumped.
  void hide_source();

 private:
  void unmount_view();

  std::filesystem::path criu_;
  std::filesystem::path dir_;
  std::filesystem::path view_;
  std::filesystem::path remote_root_;
  std::filesystem::path bin_dir_;
  int cleanup_id_ = 0;
};

}  // namespace lazyfs::bench
