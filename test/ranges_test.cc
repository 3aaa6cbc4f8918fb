// RangeSet against a bitmap model: every query over every range of a small
// domain, after exhaustive pairs and triples of operations and after long
// random sequences, at the bottom and at the very top of the uint64 space.
#include <catch2/catch.hpp>

#include <fmt/core.h>

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lazyfs/ranges.h"

using lazyfs::Range;
using lazyfs::RangeSet;

namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

std::string show(Range r) {
  return fmt::format("[{},{})", r.begin, r.end);
}

std::string show(const std::vector<Range>& v) {
  std::string s;
  for (auto r : v) s += show(r);
  return s.empty() ? "{}" : s;
}

// A bitmap over [base, base + n): the model the set is checked against.
class Model {
 public:
  Model(uint64_t base, uint64_t n) : base_(base), bits_(n, false) {}

  uint64_t n() const { return bits_.size(); }
  Range range(uint64_t a, uint64_t b) const { return {base_ + a, base_ + b}; }

  void set(Range r, bool value) {
    for (uint64_t i = r.begin; i < r.end; ++i) bits_[i - base_] = value;
  }
  bool at(uint64_t i) const { return bits_[i - base_]; }

  // Maximal runs of `value` inside r.
  std::vector<Range> runs(Range r, bool value) const {
    std::vector<Range> out;
    for (uint64_t i = r.begin; i < r.end;) {
      if (at(i) != value) {
        ++i;
        continue;
      }
      uint64_t j = i;
      while (j < r.end && at(j) == value) ++j;
      out.push_back({i, j});
      i = j;
    }
    return out;
  }
  Range all() const { return range(0, n()); }

 private:
  uint64_t base_;
  std::vector<bool> bits_;
};

// Empty when the set agrees with the model on every query over every range of
// the domain and its representation is canonical; otherwise what differs.
std::string mismatch(const RangeSet& set, const Model& model) {
  auto rs = set.ranges();
  if (rs != model.runs(model.all(), true)) {
    return "ranges " + show(rs) + " model " + show(model.runs(model.all(), true));
  }
  uint64_t total = 0;
  for (size_t i = 0; i < rs.size(); ++i) {
    if (rs[i].empty()) return "empty range " + show(rs[i]);
    if (i > 0 && rs[i - 1].end >= rs[i].begin) return "overlapping or adjacent " + show(rs);
    total += rs[i].size();
  }
  if (set.bytes() != total) return fmt::format("bytes {} but ranges hold {}", set.bytes(), total);
  if (set.count() != rs.size()) return fmt::format("count {} of {}", set.count(), rs.size());
  if (set.empty() != rs.empty()) return "empty() wrong";
  for (uint64_t a = 0; a <= model.n(); ++a) {
    for (uint64_t b = a; b <= model.n(); ++b) {
      Range q = model.range(a, b);
      auto want_in = model.runs(q, true);
      auto want_out = model.runs(q, false);
      uint64_t want_bytes = 0;
      for (auto r : want_in) want_bytes += r.size();
      if (set.contains(q) != want_out.empty()) return "contains " + show(q);
      if (set.missing(q) != want_out) return "missing " + show(q) + " = " + show(set.missing(q));
      if (set.intersect(q) != want_in) {
        return "intersect " + show(q) + " = " + show(set.intersect(q));
      }
      if (set.bytes_in(q) != want_bytes) return "bytes_in " + show(q);
    }
  }
  // Ranges that run off the domain see nothing more.
  Range beyond{model.all().end, model.all().end == kMax ? kMax : model.all().end + 5};
  if (!beyond.empty() && set.missing(beyond) != std::vector<Range>{beyond}) {
    return "missing past the domain";
  }
  // Equality is on the canonical form: rebuilding from ranges() gives an
  // equal set.
  RangeSet rebuilt;
  for (auto r : rs) rebuilt.insert(r);
  if (!(rebuilt == set)) return "not equal to a set rebuilt from its ranges";
  return {};
}

struct Op {
  bool insert;
  Range r;
};

std::string show(const Op& op) {
  return (op.insert ? "insert" : "erase") + show(op.r);
}

void apply(RangeSet& set, Model& model, const Op& op) {
  if (op.insert) {
    set.insert(op.r);
  } else {
    set.erase(op.r);
  }
  model.set(op.r, op.insert);
}

// Every insert and erase of every range [a, b), 0 <= a <= b <= n.
std::vector<Op> all_ops(const Model& model) {
  std::vector<Op> ops;
  for (uint64_t a = 0; a <= model.n(); ++a) {
    for (uint64_t b = a; b <= model.n(); ++b) {
      ops.push_back({true, model.range(a, b)});
      ops.push_back({false, model.range(a, b)});
    }
  }
  return ops;
}

// The domain's base: at zero, and ending exactly at UINT64_MAX.
std::vector<uint64_t> bases(uint64_t n) {
  return {0, kMax - n};
}

}  // namespace

TEST_CASE("ranges: an empty set", "[ranges]") {
  RangeSet s;
  CHECK(s.empty());
  CHECK(s.bytes() == 0);
  CHECK(s.count() == 0);
  CHECK(s.contains({5, 5}));
  CHECK_FALSE(s.contains({5, 6}));
  CHECK(s.missing({3, 9}) == std::vector<Range>{{3, 9}});
  CHECK(s.missing({3, 3}).empty());
  CHECK(s.intersect({0, kMax}).empty());
  CHECK(s.bytes_in({0, kMax}) == 0);
  CHECK(s.ranges().empty());
  CHECK(s == RangeSet{});
}

TEST_CASE("ranges: inserts merge overlapping and adjacent ranges", "[ranges]") {
  RangeSet s;
  s.insert({10, 20});
  s.insert({30, 40});
  CHECK(s.ranges() == std::vector<Range>{{10, 20}, {30, 40}});
  s.insert({20, 30});  // touches both: one range
  CHECK(s.ranges() == std::vector<Range>{{10, 40}});
  CHECK(s.bytes() == 30);
  s.insert({0, 5});
  s.insert({5, 10});
  CHECK(s.ranges() == std::vector<Range>{{0, 40}});
  s.insert({2, 3});  // already in
  CHECK(s.bytes() == 40);
  CHECK(s.count() == 1);
}

TEST_CASE("ranges: erase splits a straddling range", "[ranges]") {
  RangeSet s;
  s.insert({0, 100});
  s.erase({40, 60});
  CHECK(s.ranges() == std::vector<Range>{{0, 40}, {60, 100}});
  CHECK(s.bytes() == 80);
  s.erase({30, 70});
  CHECK(s.ranges() == std::vector<Range>{{0, 30}, {70, 100}});
  s.erase({0, 100});
  CHECK(s.empty());
  CHECK(s.bytes() == 0);
}

TEST_CASE("ranges: reversed ranges are empty", "[ranges]") {
  RangeSet s;
  s.insert({10, 20});
  Range reversed{15, 5};
  CHECK(reversed.empty());
  CHECK(reversed.size() == 0);
  s.insert(reversed);
  s.erase(reversed);
  CHECK(s.ranges() == std::vector<Range>{{10, 20}});
  CHECK(s.contains(reversed));
  CHECK(s.missing(reversed).empty());
  CHECK(s.intersect(reversed).empty());
  CHECK(s.bytes_in(reversed) == 0);
}

TEST_CASE("ranges: ranges near UINT64_MAX", "[ranges]") {
  RangeSet s;
  // The shape truncate_local leaves: everything from n on.
  s.insert({1000, kMax});
  CHECK(s.bytes() == kMax - 1000);
  CHECK(s.contains({kMax - 1, kMax}));
  CHECK(s.contains({1000, kMax}));
  CHECK_FALSE(s.contains({999, kMax}));
  CHECK(s.missing({0, kMax}) == std::vector<Range>{{0, 1000}});
  CHECK(s.intersect({kMax - 10, kMax}) == std::vector<Range>{{kMax - 10, kMax}});
  CHECK(s.bytes_in({kMax - 10, kMax}) == 10);

  s.insert({0, 1000});
  CHECK(s.ranges() == std::vector<Range>{{0, kMax}});
  CHECK(s.bytes() == kMax);
  CHECK(s.bytes_in({0, kMax}) == kMax);

  s.erase({kMax - 1, kMax});
  CHECK(s.ranges() == std::vector<Range>{{0, kMax - 1}});
  s.erase({5, 6});
  CHECK(s.ranges() == std::vector<Range>{{0, 5}, {6, kMax - 1}});
  CHECK(s.bytes() == kMax - 2);
  CHECK(s.missing({0, kMax}) == std::vector<Range>{{5, 6}, {kMax - 1, kMax}});

  s.insert({kMax - 1, kMax});
  s.erase({0, kMax});
  CHECK(s.empty());
  CHECK(s.bytes() == 0);
}

TEST_CASE("ranges: every pair of operations over [0,12]", "[ranges]") {
  for (uint64_t base : bases(12)) {
    Model start(base, 12);
    auto ops = all_ops(start);
    for (const auto& first : ops) {
      RangeSet set1;
      Model model1 = start;
      apply(set1, model1, first);
      auto err = mismatch(set1, model1);
      if (!err.empty()) FAIL(fmt::format("base={} after {}: {}", base, show(first), err));
      for (const auto& second : ops) {
        RangeSet set2 = set1;
        Model model2 = model1;
        apply(set2, model2, second);
        err = mismatch(set2, model2);
        if (!err.empty()) {
          FAIL(fmt::format("base={} {} then {}: {}", base, show(first), show(second), err));
        }
      }
    }
  }
}

TEST_CASE("ranges: every triple of operations over [0,5]", "[ranges]") {
  for (uint64_t base : bases(5)) {
    Model start(base, 5);
    auto ops = all_ops(start);
    for (const auto& a : ops) {
      for (const auto& b : ops) {
        RangeSet set;
        Model model = start;
        apply(set, model, a);
        apply(set, model, b);
        for (const auto& c : ops) {
          RangeSet set3 = set;
          Model model3 = model;
          apply(set3, model3, c);
          auto err = mismatch(set3, model3);
          if (!err.empty()) {
            FAIL(fmt::format("base={} {} {} {}: {}", base, show(a), show(b), show(c), err));
          }
        }
      }
    }
  }
}

TEST_CASE("ranges: random operation sequences over [0,12]", "[ranges]") {
  for (uint64_t base : bases(12)) {
    for (uint32_t seed : {1u, 2u, 3u, 42u}) {
      std::mt19937_64 rng(seed);
      Model model(base, 12);
      RangeSet set;
      std::uniform_int_distribution<uint64_t> pick(0, 12);
      for (int i = 0; i < 4000; ++i) {
        uint64_t a = pick(rng);
        uint64_t b = pick(rng);
        if (a > b) std::swap(a, b);
        // Inserts a little more often than erases, so the set fills and empties.
        Op op{rng() % 5 < 3, model.range(a, b)};
        apply(set, model, op);
        auto err = mismatch(set, model);
        if (!err.empty()) {
          FAIL(fmt::format("base={} seed={} step={} {}: {}", base, seed, i, show(op), err));
        }
      }
    }
  }
}

TEST_CASE("ranges: random operation sequences over a wide domain", "[ranges]") {
  // Longer ranges and many of them: the set against the same model over 512
  // offsets, checked by shape and by queries on random ranges.
  std::mt19937_64 rng(7);
  Model model(0, 512);
  RangeSet set;
  std::uniform_int_distribution<uint64_t> pick(0, 512);
  for (int i = 0; i < 5000; ++i) {
    uint64_t a = pick(rng);
    uint64_t b = std::min<uint64_t>(512, a + pick(rng) % 40);
    Op op{rng() % 2 == 0, model.range(a, b)};
    apply(set, model, op);
    REQUIRE(set.ranges() == model.runs(model.all(), true));
    uint64_t qa = pick(rng);
    uint64_t qb = pick(rng);
    if (qa > qb) std::swap(qa, qb);
    Range q{qa, qb};
    REQUIRE(set.missing(q) == model.runs(q, false));
    REQUIRE(set.intersect(q) == model.runs(q, true));
    REQUIRE(set.contains(q) == model.runs(q, false).empty());
  }
}
