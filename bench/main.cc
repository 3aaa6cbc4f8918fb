// lazyfs-bench: compares lazyfs with eager copies (scp, sftp, rsync) and
// sshfs at getting a checkpoint's files to a restored process, over a real
// OpenSSH server behind a shaped, delayed link, all on this machine. See
// docs/benchmarks.md for what is measured and how.
#include <sys/prctl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "criu_migration.h"
#include "delay_relay.h"
#include "interrupt.h"
#include "methods.h"
#include "netns_link.h"
#include "process.h"
#include "report.h"
#include "scenarios.h"
#include "ssh_server.h"

namespace lb = lazyfs::bench;
namespace fs = std::filesystem;

namespace {

struct LinkSpec {
  std::string name;
  uint64_t rate_bps;  // 0: unlimited
  std::chrono::microseconds rtt;
};

const std::vector<LinkSpec>& link_specs() {
  static const std::vector<LinkSpec> links{
      {"loopback", 0, std::chrono::microseconds(0)},
      {"1g-2ms", 1'000'000'000, std::chrono::microseconds(2000)},
      {"100m-20ms", 100'000'000, std::chrono::microseconds(20000)},
  };
  return links;
}

struct Options {
  bool quick = false;
  double scale = 1.0;
  std::vector<std::string> scenarios, methods, links;
  unsigned runs = 3;
  std::string criu;
  std::string json, png;
  std::string work_dir = "/var/tmp";
  std::string data_dir;
  bool keep = false;
  bool verbose = false;
  std::vector<std::string> lazyfs_options;
  std::string sftp_server = "external";
  std::string restore_fs = "ext4";
};

std::string gib(uint64_t bytes) {
  return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1u << 30));
}

uint64_t free_bytes(const fs::path& dir) {
  struct statvfs sv {};
  if (::statvfs(dir.c_str(), &sv) != 0) return 0;
  return static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
}

bool same_filesystem(const fs::path& a, const fs::path& b) {
  struct statvfs sa {
  }, sb{};
  return ::statvfs(a.c_str(), &sa) == 0 && ::statvfs(b.c_str(), &sb) == 0 && sa.f_fsid == sb.f_fsid;
}

// Progress on stderr: one rewritten line on a terminal, plain lines else.
class Progress {
 public:
  void line(const std::string& text) {
    if (tty_) {
      fmt::print(stderr, "\r\033[K{}", text);
    } else {
      fmt::print(stderr, "{}\n", text);
    }
    std::fflush(stderr);
  }
  void done() {
    if (tty_) fmt::print(stderr, "\n");
  }

 private:
  bool tty_ = ::isatty(2) != 0;
};

std::vector<std::string> pick(const std::vector<std::string>& asked,
                              const std::vector<std::string>& all, const char* what) {
  if (asked.empty()) return all;
  for (const auto& a : asked) {
    if (std::find(all.begin(), all.end(), a) == all.end()) {
      std::string known;
      for (const auto& k : all) known += (known.empty() ? "" : ", ") + k;
      throw CLI::ValidationError(fmt::format("unknown {} '{}' (known: {})", what, a, known));
    }
  }
  // In the canonical order, once each.
  std::vector<std::string> out;
  for (const auto& k : all) {
    if (std::find(asked.begin(), asked.end(), k) != asked.end()) out.push_back(k);
  }
  return out;
}

int run_bench(const Options& o, const std::vector<std::string>& argv_text) {
  const auto scenario_list = pick(o.scenarios, lb::scenario_names(), "scenario");
  const auto method_list = pick(o.methods, lb::method_names(), "method");
  std::vector<std::string> link_names;
  for (const auto& l : link_specs()) link_names.push_back(l.name);
  auto chosen_links = o.links;
  if (chosen_links.empty() && o.quick) chosen_links = {"loopback", "1g-2ms"};
  const auto link_list = pick(chosen_links, link_names, "link");

  if (::geteuid() != 0) {
    fmt::print(stderr, "lazyfs-bench: needs root (network namespace, tc, sshd, mounts)\n");
    return 2;
  }
  const fs::path bin_dir = fs::read_symlink("/proc/self/exe").parent_path();
  std::vector<std::string> needed{"ssh", "ssh-keygen", "sshd", "ip", "tc"};
  for (const auto& m : method_list) {
    if (m == "eager-scp") needed.push_back("scp");
    if (m == "eager-sftp") needed.push_back("sftp");
    if (m == "eager-rsync") needed.push_back("rsync");
    if (m == "sshfs") needed.push_back("sshfs");
  }
  if (!o.png.empty()) needed.push_back("gnuplot");
  if (o.restore_fs == "ext4") {
    needed.push_back("mkfs.ext4");
    needed.push_back("mount");
  }
  for (const auto& p : needed) {
    if (!lb::find_program(p)) {
      fmt::print(stderr,
                 "lazyfs-bench: {} not found; install the benchmark's packages with "
                 "scripts/install-deps.sh\n",
                 p);
      return 2;
    }
  }
  for (const char* p : {"lazyfs", "lazyfs-bench-workload"}) {
    if (::access((bin_dir / p).c_str(), X_OK) != 0) {
      fmt::print(stderr, "lazyfs-bench: {} missing; build the project first\n",
                 (bin_dir / p).string());
      return 2;
    }
  }
  std::string criu_version;
  if (!o.criu.empty()) {
    try {
      criu_version = lb::check_criu(o.criu);
    } catch (const std::exception& e) {
      fmt::print(stderr, "lazyfs-bench: {}\n", e.what());
      return 2;
    }
  }

  lb::install_interrupt_handler();
  // Detached daemons (lazyfs) and helpers of dead parents are reaped here.
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);

  std::vector<lb::Scenario> scenarios;
  for (const auto& name : scenario_list) scenarios.push_back(lb::make_scenario(name, o.scale));

  fs::create_directories(o.work_dir);
  std::string tmpl = (fs::path(o.work_dir) / "lazyfs-bench.XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) {
    fmt::print(stderr, "lazyfs-bench: cannot create a scratch directory in {}\n", o.work_dir);
    return 2;
  }
  const fs::path scratch = tmpl;
  if (!o.keep) {
    lb::CleanupStack::push("scratch " + scratch.string(), [scratch] { lb::remove_tree(scratch); });
  }
  const fs::path source_root =
      o.data_dir.empty() ? scratch / "src" : fs::absolute(o.data_dir) / "src";
  fs::create_directories(source_root);

  // Space: the data (unless already there), plus one scenario's worth for an
  // eager copy or a lazyfs cache, plus a margin.
  uint64_t to_write = 0, largest = 0;
  for (const auto& s : scenarios) {
    to_write += lb::bytes_to_generate(s, source_root);
    largest = std::max(largest, s.total_bytes);
  }
  const uint64_t margin = 512ull << 20;
  if (same_filesystem(source_root, scratch)) {
    const uint64_t need = to_write + largest + margin;
    if (free_bytes(scratch) < need) {
      fmt::print(stderr, "lazyfs-bench: {} has {} free, the run needs {} (data {} + copies {})\n",
                 scratch.string(), gib(free_bytes(scratch)), gib(need), gib(to_write),
                 gib(largest));
      lb::CleanupStack::run_all();
      return 2;
    }
  } else if (free_bytes(source_root) < to_write + margin ||
             free_bytes(scratch) < largest + margin) {
    fmt::print(stderr, "lazyfs-bench: not enough free space for {} of data and {} of copies\n",
               gib(to_write), gib(largest));
    lb::CleanupStack::run_all();
    return 2;
  }

  Progress progress;
  std::vector<lb::ResultRow> rows;
  int exit_status = 0;
  try {
    // Source files, checkpoints, plans.
    uint64_t base = 0;
    for (const auto& s : scenarios) {
      const uint64_t need = lb::bytes_to_generate(s, source_root);
      if (need == 0) continue;
      uint64_t last = 0;
      lb::generate(s, source_root, [&](uint64_t done) {
        if (done - last < (256u << 20) && done != need) return;
        last = done;
        progress.line(
            fmt::format("generating source files: {} of {}", gib(base + done), gib(to_write)));
      });
      base += need;
    }
    if (to_write) progress.done();
    std::vector<lb::PreparedScenario> prepared;
    for (const auto& s : scenarios) {
      lb::PreparedScenario p;
      p.scenario = &s;
      const auto dir = scratch / "scenarios" / s.name;
      fs::create_directories(dir);
      p.checkpoint = dir / "checkpoint";
      lb::write_scenario_checkpoint(s, p.checkpoint);
      p.plan_file = dir / "plan.txt";
      lb::write_plan(p.plan_file, s.plan);
      prepared.push_back(std::move(p));
    }

    // The link, the server, the relay.
    lb::NetnsLink link;
    lb::SshServer ssh(
        scratch / "ssh", link,
        o.sftp_server == "internal" ? "internal-sftp" : "/usr/lib/openssh/sftp-server");
    lb::DelayRelay relay(link.inner_address(), 22);
    ssh.trust_at(relay.port());
    // Room for an eager copy beside the cache of a recording mount, and
    // inodes for a data file and a map per file (the image is sparse).
    size_t most_files = 0;
    for (const auto& s : scenarios) most_files = std::max(most_files, s.files.size());
    const lb::RestoreFs restore_fs{o.restore_fs == "ext4", 2 * largest + (1ull << 30),
                                   4 * most_files + 65536};
    lb::BenchContext ctx{scratch, source_root, bin_dir,          &ssh,
                         &relay,  o.verbose,   o.lazyfs_options, restore_fs};

    std::unique_ptr<lb::CriuMigration> criu;
    if (!o.criu.empty()) {
      criu = std::make_unique<lb::CriuMigration>(o.criu, scratch / "criu", source_root, bin_dir);
      for (auto& p : prepared) {
        progress.line("criu dump: " + p.scenario->name);
        criu->dump(p);
      }
      criu->hide_source();
    }

    const size_t total = link_list.size() * prepared.size() * method_list.size() * o.runs;
    size_t step = 0;
    for (const auto& link_name : link_list) {
      const auto& spec = *std::find_if(link_specs().begin(), link_specs().end(),
                                       [&](const LinkSpec& l) { return l.name == link_name; });
      link.shape(spec.rate_bps);
      relay.set_one_way_delay(spec.rtt / 2);
      for (const auto& p : prepared) {
        // Run by run, every method in turn (run 1 of each, then run 2, ...):
        // a slow spell of the machine then spreads over the methods instead
        // of landing on the runs of one. Up to v15 one method's runs went in
        // a row, and in one v15 set a slow spell doubled plain lazyfs's three
        // runs while the other methods' were as usual.
        std::vector<lb::ResultRow> by_method;
        for (const auto& method : method_list) {
          by_method.push_back({link_name, p.scenario->name, method, {}, ""});
        }
        for (unsigned run = 1; run <= o.runs; ++run) {
          for (auto& row : by_method) {
            lb::check_interrupted();
            progress.line(fmt::format("[{}/{}] {} {} {} run {}/{}", ++step, total, link_name,
                                      p.scenario->name, row.method, run, o.runs));
            try {
              row.samples.push_back(lb::run_method(row.method, p, ctx));
            } catch (const lb::Interrupted&) {
              throw;
            } catch (const std::exception& e) {
              row.error = e.what();
              progress.line(fmt::format("{} {} {} run {} failed: {}", link_name, p.scenario->name,
                                        row.method, run, e.what()));
              if (::isatty(2)) fmt::print(stderr, "\n");  // keep the message on screen
              exit_status = 1;
            }
            lb::reap_strays({});
          }
        }
        for (auto& row : by_method) rows.push_back(std::move(row));
      }
    }
    progress.done();
    link.shape(0);
  } catch (const lb::Interrupted&) {
    progress.done();
    lb::CleanupStack::run_all();
    fmt::print(stderr, "lazyfs-bench: interrupted; everything it started is cleaned up\n");
    return 130;
  } catch (const std::exception& e) {
    progress.done();
    lb::CleanupStack::run_all();
    fmt::print(stderr, "lazyfs-bench: {}\n", e.what());
    return 1;
  }

  fmt::print("{}", lb::results_table(rows));
  std::string command;
  for (const auto& a : argv_text) command += (command.empty() ? "" : " ") + a;
  if (!o.json.empty()) {
    nlohmann::json doc;
    doc["machine"] = lb::machine_info();
    doc["config"] = {{"command", command},
                     {"scale", o.scale},
                     {"runs", o.runs},
                     {"quick", o.quick},
                     {"criu", o.criu.empty() ? nlohmann::json(nullptr) : nlohmann::json(o.criu)},
                     {"criu_version", criu_version},
                     {"links", link_list},
                     {"methods", method_list},
                     {"scenarios", scenario_list},
                     {"lazyfs_options", o.lazyfs_options},
                     {"sftp_server", o.sftp_server},
                     {"restore_fs", o.restore_fs}};
    nlohmann::json links = nlohmann::json::array();
    for (const auto& l : link_specs()) {
      if (std::find(link_list.begin(), link_list.end(), l.name) == link_list.end()) continue;
      links.push_back({{"name", l.name},
                       {"rate_bps", l.rate_bps},
                       {"rtt_ms", static_cast<double>(l.rtt.count()) / 1000.0}});
    }
    doc["links"] = links;
    nlohmann::json sj = nlohmann::json::array();
    for (const auto& s : scenarios) {
      sj.push_back({{"name", s.name},
                    {"description", s.description},
                    {"files", s.files.size()},
                    {"total_bytes", s.total_bytes},
                    {"bytes_read", s.bytes_read},
                    {"touched_bytes_4k", s.touched_bytes(4096)},
                    {"touched_bytes_128k", s.touched_bytes(128 << 10)}});
    }
    doc["scenarios"] = sj;
    doc["results"] = lb::results_json(rows);
    std::ofstream out(o.json, std::ios::trunc);
    out << doc.dump(2) << '\n';
    if (!out) {
      fmt::print(stderr, "lazyfs-bench: cannot write {}\n", o.json);
      exit_status = 1;
    }
  }
  if (!o.png.empty()) {
    try {
      lb::write_chart(rows, o.png, scratch / "chart",
                      fmt::format("lazyfs-bench: restore-ready latency, median of {} run(s), "
                                  "scale {}",
                                  o.runs, o.scale));
    } catch (const std::exception& e) {
      fmt::print(stderr, "lazyfs-bench: chart: {}\n", e.what());
      exit_status = 1;
    }
  }
  lb::CleanupStack::run_all();
  return exit_status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Benchmarks lazyfs against eager copies and sshfs at restoring a checkpoint's files, over "
      "a local OpenSSH server behind a shaped link (needs root)"};
  Options o;
  bool scale_set = false, runs_set = false;
  app.add_flag("--quick", o.quick,
               "Small and fast: scale 0.01, 1 run, links loopback and 1g-2ms (a smoke test)");
  app.add_option("--scale", o.scale, "Multiply every scenario's sizes (default 1.0)")
      ->check(CLI::Range(0.0001, 64.0))
      ->each([&](const std::string&) { scale_set = true; });
  app.add_option("--scenario", o.scenarios,
                 "big-sparse, many-small, full-sequential, mmap-random (repeatable; default all)");
  app.add_option("--method", o.methods,
                 "eager-scp, eager-sftp, eager-rsync, sshfs, lazyfs, lazyfs+fill, "
                 "lazyfs+fill-auto, lazyfs+fill-first, lazyfs+prefetch (repeatable; default all)");
  app.add_option("--link", o.links, "loopback, 1g-2ms, 100m-20ms (repeatable; default all)");
  app.add_option("--runs", o.runs, "Cold runs per combination (default 3, --quick 1)")
      ->check(CLI::Range(1, 100))
      ->each([&](const std::string&) { runs_set = true; });
  app.add_option("--criu", o.criu,
                 "Do real migrations with this criu binary (criu dump, then criu restore per "
                 "method)");
  app.add_option("--json", o.json, "Write the results as JSON here");
  app.add_option("--png", o.png, "Draw restore-ready latency here (gnuplot)");
  app.add_option("--work-dir", o.work_dir,
                 "Where the scratch directory is made (default /var/tmp)");
  app.add_option("--data-dir", o.data_dir,
                 "Keep the generated source files here and reuse them in later runs (default: "
                 "inside the scratch directory, removed at the end)");
  app.add_flag("--keep-scratch", o.keep, "Leave the scratch directory (logs) behind");
  app.add_flag("-v,--verbose", o.verbose, "Print every command run");
  app.add_option(
      "--lazyfs-option", o.lazyfs_options,
      "Give every `lazyfs mount` this option too, e.g. --lazyfs-option=--fill-alongside=4M "
      "(repeatable; write it with '=')");
  app.add_option("--sftp-server", o.sftp_server,
                 "How the source's sshd serves SFTP: external (Debian's default: "
                 "/usr/lib/openssh/sftp-server, started through the login shell) or internal "
                 "(internal-sftp, no shell)")
      ->check(CLI::IsMember({"external", "internal"}));
  app.add_option("--restore-fs", o.restore_fs,
                 "Where each run's restore side (copies, lazyfs cache, mountpoint) lives: ext4 (a "
                 "fresh file system per run, made by mkfs.ext4 with its defaults in a sparse "
                 "image in the scratch directory and loop-mounted; default) or scratch (the "
                 "scratch directory's own file system, shared by every run)")
      ->check(CLI::IsMember({"ext4", "scratch"}));
  CLI11_PARSE(app, argc, argv);
  if (o.quick) {
    if (!scale_set) o.scale = 0.01;
    if (!runs_set) o.runs = 1;
  }
  std::vector<std::string> argv_text(argv, argv + argc);
  try {
    return run_bench(o, argv_text);
  } catch (const CLI::ValidationError& e) {
    fmt::print(stderr, "lazyfs-bench: {}\n", e.what());
    return 2;
  }
}
