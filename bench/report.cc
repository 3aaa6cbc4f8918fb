#include "report.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "process.h"

namespace lazyfs::bench {
namespace {

namespace fs = std::filesystem;

std::string first_line(std::string text) {
  auto nl = text.find('\n');
  if (nl != std::string::npos) text.resize(nl);
  return text;
}

std::string tool_version(const std::vector<std::string>& argv) {
  try {
    auto r = run(argv);
    return first_line(r.out.empty() ? r.err : r.out);
  } catch (const std::exception&) {
    return "";
  }
}

std::vector<std::string> ordered_unique(const std::vector<ResultRow>& rows,
                                        std::string ResultRow::*field) {
  std::vector<std::string> out;
  for (const auto& r : rows) {
    if (std::find(out.begin(), out.end(), r.*field) == out.end()) out.push_back(r.*field);
  }
  return out;
}

template <typename Get>
std::vector<double> collect(const ResultRow& r, Get get) {
  std::vector<double> v;
  for (const auto& s : r.samples) v.push_back(get(s));
  return v;
}

// The spread of an optional field over the samples that have it; nothing if
// none has.
template <typename T>
std::optional<Spread> optional_spread(const ResultRow& r, std::optional<T> Sample::*field) {
  std::vector<double> v;
  for (const auto& s : r.samples) {
    if (s.*field) v.push_back(static_cast<double>(*(s.*field)));
  }
  if (v.empty()) return std::nullopt;
  return spread(std::move(v));
}

std::string mib(double bytes) {
  return fmt::format("{:.2f}", bytes / 1048576.0);
}

}  // namespace

Spread spread(std::vector<double> v) {
  Spread s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  s.median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
  s.min = v.front();
  s.max = v.back();
  return s;
}

nlohmann::json machine_info() {
  nlohmann::json m;
  m["nproc"] = std::thread::hardware_concurrency();
  std::ifstream cpu("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpu, line)) {
    if (line.rfind("model name", 0) == 0) {
      m["cpu_model"] = line.substr(line.find(':') + 2);
      break;
    }
  }
  utsname u{};
  if (::uname(&u) == 0) {
    m["kernel"] = std::string(u.sysname) + " " + u.release;
    m["arch"] = u.machine;
  }
  std::ifstream mem("/proc/meminfo");
  while (std::getline(mem, line)) {
    if (line.rfind("MemTotal:", 0) == 0) {
      m["mem_total_kib"] = std::stoull(line.substr(9));
      break;
    }
  }
  m["openssh"] = tool_version({"ssh", "-V"});
  // sshfs prints its own version and then libfuse's and fusermount's.
  try {
    auto r = run({"sshfs", "--version"});
    std::istringstream lines(r.out + r.err);
    std::string l;
    while (std::getline(lines, l)) {
      if (l.find("SSHFS") != std::string::npos) m["sshfs"] = l;
    }
  } catch (const std::exception&) {
  }
  m["rsync"] = tool_version({"rsync", "--version"});
  return m;
}

nlohmann::json results_json(const std::vector<ResultRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rows) {
    nlohmann::json j;
    j["scenario"] = r.scenario;
    j["method"] = r.method;
    j["link"] = r.link;
    j["runs"] = r.samples.size();
    if (!r.error.empty()) j["error"] = r.error;
    if (r.samples.empty()) {
      out.push_back(j);
      continue;
    }
    const auto ready = spread(collect(r, [](const Sample& s) { return s.ready_s; }));
    const auto first = spread(collect(r, [](const Sample& s) { return s.first_byte_s; }));
    const auto bytes = spread(
        collect(r, [](const Sample& s) { return static_cast<double>(s.to_server + s.to_client); }));
    const auto up = spread(collect(r, [](const Sample& s) { return double(s.to_server); }));
    const auto down = spread(collect(r, [](const Sample& s) { return double(s.to_client); }));
    j["restore_ready_s"] = ready.median;
    j["restore_ready_min_s"] = ready.min;
    j["restore_ready_max_s"] = ready.max;
    j["first_byte_s"] = first.median;
    j["first_byte_min_s"] = first.min;
    j["first_byte_max_s"] = first.max;
    j["setup_s"] = spread(collect(r, [](const Sample& s) { return s.setup_s; })).median;
    j["bytes_over_link"] = static_cast<uint64_t>(std::llround(bytes.median));
    j["bytes_over_link_min"] = static_cast<uint64_t>(std::llround(bytes.min));
    j["bytes_over_link_max"] = static_cast<uint64_t>(std::llround(bytes.max));
    j["bytes_to_server"] = static_cast<uint64_t>(std::llround(up.median));
    j["bytes_to_client"] = static_cast<uint64_t>(std::llround(down.median));
    j["bytes_read"] = r.samples.front().bytes_read;
    if (r.samples.front().lazyfs_cpu_s) {
      const auto cpu = spread(collect(r, [](const Sample& s) { return *s.lazyfs_cpu_s; }));
      const auto rss = spread(
          collect(r, [](const Sample& s) { return static_cast<double>(*s.lazyfs_peak_rss_kib); }));
      const auto fetched = spread(
          collect(r, [](const Sample& s) { return static_cast<double>(*s.lazyfs_fetched_bytes); }));
      j["lazyfs_cpu_s"] = cpu.median;
      j["lazyfs_cpu_max_s"] = cpu.max;
      j["lazyfs_peak_rss_kib"] = static_cast<uint64_t>(std::llround(rss.median));
      j["lazyfs_peak_rss_max_kib"] = static_cast<uint64_t>(std::llround(rss.max));
      j["lazyfs_fetched_bytes"] = static_cast<uint64_t>(std::llround(fetched.median));
    } else {
      j["lazyfs_cpu_s"] = nullptr;
      j["lazyfs_peak_rss_kib"] = nullptr;
    }
    if (const auto misses = optional_spread(r, &Sample::demand_misses)) {
      j["demand_misses"] = static_cast<uint64_t>(std::llround(misses->median));
      j["demand_misses_min"] = static_cast<uint64_t>(std::llround(misses->min));
      j["demand_misses_max"] = static_cast<uint64_t>(std::llround(misses->max));
    } else {
      j["demand_misses"] = nullptr;
    }
    if (const auto local = optional_spread(r, &Sample::wholly_local_s)) {
      j["wholly_local_s"] = local->median;
      j["wholly_local_min_s"] = local->min;
      j["wholly_local_max_s"] = local->max;
    } else {
      j["wholly_local_s"] = nullptr;
    }
    nlohmann::json samples = nlohmann::json::array();
    for (const auto& s : r.samples) {
      nlohmann::json sj{{"restore_ready_s", s.ready_s},
                        {"first_byte_s", s.first_byte_s},
                        {"setup_s", s.setup_s},
                        {"bytes_to_server", s.to_server},
                        {"bytes_to_client", s.to_client}};
      if (s.lazyfs_cpu_s) {
        sj["lazyfs_cpu_s"] = *s.lazyfs_cpu_s;
        sj["lazyfs_peak_rss_kib"] = *s.lazyfs_peak_rss_kib;
        sj["lazyfs_fetched_bytes"] = *s.lazyfs_fetched_bytes;
      }
      if (s.demand_misses) sj["demand_misses"] = *s.demand_misses;
      if (s.wholly_local_s) sj["wholly_local_s"] = *s.wholly_local_s;
      samples.push_back(sj);
    }
    j["samples"] = samples;
    out.push_back(j);
  }
  return out;
}

std::string results_table(const std::vector<ResultRow>& rows) {
  std::string out =
      fmt::format("{:<10} {:<16} {:<15} {:>9} {:>19} {:>9} {:>8} {:>11} {:>8} {:>9} {:>7} {:>8}\n",
                  "link", "scenario", "method", "ready_s", "(min-max)", "first_s", "setup_s",
                  "MiB_link", "lfs_cpu", "lfs_rss_M", "misses", "local_s");
  for (const auto& r : rows) {
    if (r.samples.empty()) {
      out += fmt::format("{:<10} {:<16} {:<15} FAILED: {}\n", r.link, r.scenario, r.method,
                         first_line(r.error));
      continue;
    }
    const auto ready = spread(collect(r, [](const Sample& s) { return s.ready_s; }));
    const auto first = spread(collect(r, [](const Sample& s) { return s.first_byte_s; }));
    const auto bytes = spread(
        collect(r, [](const Sample& s) { return static_cast<double>(s.to_server + s.to_client); }));
    std::string cpu = "-", rss = "-";
    if (r.samples.front().lazyfs_cpu_s) {
      cpu = fmt::format("{:.2f}",
                        spread(collect(r, [](const Sample& s) { return *s.lazyfs_cpu_s; })).median);
      rss =
          fmt::format("{:.1f}", spread(collect(r,
                                               [](const Sample& s) {
                                                 return static_cast<double>(*s.lazyfs_peak_rss_kib);
                                               }))
                                        .median /
                                    1024);
    }
    const auto setup = spread(collect(r, [](const Sample& s) { return s.setup_s; }));
    std::string misses = "-", local = "-";
    if (const auto m = optional_spread(r, &Sample::demand_misses)) {
      misses = fmt::format("{:.0f}", m->median);
    }
    if (const auto l = optional_spread(r, &Sample::wholly_local_s)) {
      local = fmt::format("{:.3f}", l->median);
    }
    out += fmt::format(
        "{:<10} {:<16} {:<15} {:>9.3f} {:>19} {:>9.3f} {:>8.3f} {:>11} {:>8} {:>9} {:>7} {:>8}{}\n",
        r.link, r.scenario, r.method, ready.median,
        fmt::format("({:.3f}-{:.3f})", ready.min, ready.max), first.median, setup.median,
        mib(bytes.median), cpu, rss, misses, local, r.error.empty() ? "" : " (some runs failed)");
  }
  return out;
}

void write_chart(const std::vector<ResultRow>& rows, const fs::path& png, const fs::path& work_dir,
                 const std::string& title) {
  const auto links = ordered_unique(rows, &ResultRow::link);
  const auto scenarios = ordered_unique(rows, &ResultRow::scenario);
  const auto methods = ordered_unique(rows, &ResultRow::method);
  fs::create_directories(work_dir);
  double lowest = 1e9;
  std::vector<fs::path> data_files;
  for (const auto& link : links) {
    const auto file = work_dir / ("chart-" + link + ".dat");
    std::ofstream out(file, std::ios::trunc);
    out << "scenario";
    for (const auto& m : methods) out << ' ' << m;
    out << '\n';
    for (const auto& s : scenarios) {
      out << s;
      for (const auto& m : methods) {
        auto it = std::find_if(rows.begin(), rows.end(), [&](const ResultRow& r) {
          return r.link == link && r.scenario == s && r.method == m;
        });
        if (it == rows.end() || it->samples.empty()) {
          out << " NaN";
          continue;
        }
        const double v = spread(collect(*it, [](const Sample& x) { return x.ready_s; })).median;
        lowest = std::min(lowest, v);
        out << ' ' << fmt::format("{:.6f}", v);
      }
      out << '\n';
    }
    data_files.push_back(file);
  }
  const double floor = std::pow(10.0, std::floor(std::log10(std::max(lowest, 1e-4))));
  auto script = [&](const std::string& terminal) {
    std::ostringstream g;
    g << "set terminal " << terminal << " size 1100," << 80 + 420 * links.size() << "\n";
    g << "set output '" << png.string() << "'\n";
    g << "set datafile missing 'NaN'\n";
    g << "set multiplot layout " << links.size() << ",1 title \"" << title << "\"\n";
    g << "set style data histograms\nset style histogram clustered gap 1\n";
    g << "set style fill solid 0.85 border -1\nset boxwidth 0.9\n";
    g << "set logscale y\nset yrange [" << floor << ":*]\nset grid ytics\n";
    g << "set ylabel 'restore-ready latency (s, log scale)'\n";
    g << "set key outside right top vertical\n";
    for (size_t i = 0; i < links.size(); ++i) {
      g << "set title 'link: " << links[i] << "'\n";
      g << "plot '" << data_files[i].string() << "'";
      for (size_t m = 0; m < methods.size(); ++m) {
        if (m > 0) g << ", ''";
        g << " using " << m + 2 << (m == 0 ? ":xtic(1)" : "") << " title columnheader(" << m + 2
          << ")";
      }
      g << "\n";
    }
    g << "unset multiplot\n";
    return g.str();
  };
  const auto script_file = work_dir / "chart.gp";
  for (const char* terminal : {"pngcairo", "png"}) {
    std::ofstream(script_file, std::ios::trunc) << script(terminal);
    auto r = run({"gnuplot", script_file.string()});
    if (r.ok() && fs::exists(png) && fs::file_size(png) > 0) return;
    if (std::string(terminal) == "png") {
      throw std::runtime_error("gnuplot failed: " + first_line(r.err));
    }
  }
}

}  // namespace lazyfs::bench
