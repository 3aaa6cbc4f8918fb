// What a benchmark run reports: the samples per (link, scenario, method)
// reduced to medians and spreads, printed as a table, written as JSON (schema
// in docs/benchmarks.md) and drawn with gnuplot.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "methods.h"

namespace lazyfs::bench {

struct ResultRow {
  std::string link;
  std::string scenario;
  std::string method;
  std::vector<Sample> samples;
  std::string error;  // set when a run failed; samples then holds the runs that worked
};

struct Spread {
  double median = 0, min = 0, max = 0;
};
Spread spread(std::vector<double> values);

// The machine the numbers come from: nproc, CPU model, kernel, memory, and
// the versions of the tools compared.
nlohmann::json machine_info();

nlohmann::json results_json(const std::vector<ResultRow>& rows);

// The table of medians, one line per row.
std::string results_table(const std::vector<ResultRow>& rows);

// Restore-ready latency by scenario and method, log scale, one panel per
// link. Throws if gnuplot fails.
void write_chart(const std::vector<ResultRow>& rows, const std::filesystem::path& png,
                 const std::filesystem::path& work_dir, const std::string& title);

}  // namespace lazyfs::bench
