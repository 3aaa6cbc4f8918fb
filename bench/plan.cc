#include "plan.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace lazyfs::bench {

void write_plan(const std::filesystem::path& file, const Plan& plan) {
  std::ofstream out(file, std::ios::trunc);
  for (const auto& step : plan) {
    switch (step.kind) {
      case PlanStep::Kind::kRanges:
        out << "file " << step.path << " ranges\n";
        for (const auto& [off, len] : step.ranges) out << "r " << off << ' ' << len << '\n';
        break;
      case PlanStep::Kind::kWhole:
        out << "file " << step.path << " whole " << step.buffer << '\n';
        break;
      case PlanStep::Kind::kMmap:
        out << "file " << step.path << " mmap\n";
        for (const auto& r : step.ranges) out << "p " << r.first << '\n';
        break;
    }
  }
  out.flush();
  if (!out) throw std::runtime_error("cannot write plan " + file.string());
}

Plan read_plan(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("cannot open plan " + file.string());
  Plan plan;
  std::string line;
  size_t lineno = 0;
  auto bad = [&]() {
    return std::runtime_error(file.string() + ":" + std::to_string(lineno) +
                              ": bad plan line: " + line);
  };
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    std::istringstream fields(line);
    std::string word;
    fields >> word;
    if (word == "file") {
      PlanStep step;
      std::string kind;
      fields >> step.path >> kind;
      if (kind == "ranges") {
        step.kind = PlanStep::Kind::kRanges;
      } else if (kind == "whole") {
        step.kind = PlanStep::Kind::kWhole;
        if (!(fields >> step.buffer) || step.buffer == 0) throw bad();
      } else if (kind == "mmap") {
        step.kind = PlanStep::Kind::kMmap;
      } else {
        throw bad();
      }
      if (step.path.empty() || step.path[0] != '/') throw bad();
      plan.push_back(std::move(step));
    } else if (word == "r" || word == "p") {
      if (plan.empty()) throw bad();
      uint64_t off = 0, len = 1;
      if (!(fields >> off)) throw bad();
      if (word == "r" && !(fields >> len)) throw bad();
      plan.back().ranges.emplace_back(off, len);
    } else {
      throw bad();
    }
  }
  return plan;
}

}  // namespace lazyfs::bench
