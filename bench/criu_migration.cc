#include "criu_migration.h"

#include <sys/mount.h>

#include <fmt/core.h>

#include <fstream>
#include <stdexcept>
#include <thread>

#include "interrupt.h"
#include "process.h"

namespace lazyfs::bench {
namespace {
namespace fs = std::filesystem;
}

std::string check_criu(const fs::path& criu) {
  ProcessResult r;
  try {
    r = run({criu.string(), "--version"});
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format(
        "--criu {}: cannot run it ({}); a working CRIU is needed for real migrations, or leave "
        "--criu out to run the workload in place",
        criu.string(), e.what()));
  }
  if (!r.ok()) {
    auto said = r.err.empty() ? r.out : r.err;
    said = said.substr(0, said.find('\n'));
    throw std::runtime_error(fmt::format(
        "--criu {}: this binary does not run (`--version` exited {}: {}); a working CRIU is "
        "needed for real migrations, or leave --criu out to run the workload in place",
        criu.string(), r.status, said));
  }
  auto line = r.out.substr(0, r.out.find('\n'));
  return line;
}

CriuMigration::CriuMigration(fs::path criu, const fs::path& dir, const fs::path& source_root,
                             const fs::path& bin_dir)
    : criu_(std::move(criu)), dir_(dir), view_(dir / "view"), bin_dir_(bin_dir) {
  fs::create_directories(view_);
  if (::mount(source_root.c_str(), view_.c_str(), nullptr, MS_BIND, nullptr) != 0) {
    throw std::runtime_error("cannot bind-mount the source tree at " + view_.string());
  }
  cleanup_id_ = CleanupStack::push("bind mount " + view_.string(), [this] { unmount_view(); });
  try {
    // lazyfs reads file Q (a path under VIEW) at REMOTE_ROOT + Q: make that
    // name the source tree.
    remote_root_ = dir / "remote-root";
    const fs::path link = remote_root_.string() + view_.string();
    fs::create_directories(link.parent_path());
    fs::create_directory_symlink(source_root, link);
  } catch (...) {
    CleanupStack::run(cleanup_id_);  // the destructor will not run
    throw;
  }
}

CriuMigration::~CriuMigration() {
  CleanupStack::run(cleanup_id_);
}

void CriuMigration::unmount_view() {
  ::umount2(view_.c_str(), MNT_DETACH);
}

void CriuMigration::hide_source() {
  CleanupStack::run(cleanup_id_);
}

void CriuMigration::dump(PreparedScenario& p) {
  const auto& s = *p.scenario;
  p.criu = criu_;
  p.files_root = view_;
  p.lazyfs_remote_root = remote_root_;
  p.criu_dir = dir_ / s.name;
  fs::create_directories(p.criu_dir);
  const auto images = p.criu_dir / "images";
  fs::create_directories(images);
  const auto ready = p.criu_dir / "ready";
  SpawnOptions o;
  o.new_session = true;  // no controlling terminal: no --shell-job needed
  Child w =
      spawn({(bin_dir_ / "lazyfs-bench-workload").string(), "--plan", p.plan_file.string(),
             "--root", view_.string(), "--hold", "--ready-file", ready.string(), "--go-file",
             (p.criu_dir / "go").string(), "--result-file", (p.criu_dir / "result.json").string()},
            o);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(ready)) {
    check_interrupted();
    ProcessResult r;
    if (w.try_wait(r)) throw std::runtime_error("the workload to dump exited early");
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("the workload to dump did not get ready");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto r = run({criu_.string(), "dump", "-t", std::to_string(w.pid()), "-D", images.string(), "-o",
                (p.criu_dir / "dump.log").string(), "-v4"});
  if (!r.ok()) {
    check_interrupted();
    throw std::runtime_error(
        fmt::format("criu dump failed ({}); see {}", r.status, (p.criu_dir / "dump.log").string()));
  }
  w.wait();  // criu dump kills the dumped task
  p.checkpoint = images;
}

}  // namespace lazyfs::bench
