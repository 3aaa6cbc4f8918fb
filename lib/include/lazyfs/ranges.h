// RangeSet: a set of byte offsets kept as disjoint, non-adjacent half-open
// ranges [begin, end). A pure value type: no locking, no I/O. The cache keeps
// one per file for the bytes present and one for the bytes written locally.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace lazyfs {

struct Range {
  uint64_t begin = 0;
  uint64_t end = 0;  // exclusive

  uint64_t size() const { return end > begin ? end - begin : 0; }
  bool empty() const { return end <= begin; }
  bool operator==(const Range&) const = default;
};

class RangeSet {
 public:
  // Adds [r.begin, r.end), merging with overlapping and adjacent ranges.
  void insert(Range r);
  // Removes [r.begin, r.end), splitting a range that straddles an end.
  void erase(Range r);
  // True when every byte of `r` is in the set (an empty range always is).
  bool contains(Range r) const;
  // The parts of `r` not in the set, ascending.
  std::vector<Range> missing(Range r) const;
  // The parts of `r` in the set, ascending.
  std::vector<Range> intersect(Range r) const;
  // Bytes in the set.
  uint64_t bytes() const { return bytes_; }
  // Bytes of `r` in the set.
  uint64_t bytes_in(Range r) const;
  // Number of disjoint ranges.
  size_t count() const { return ranges_.size(); }
  bool empty() const { return ranges_.empty(); }
  void clear();
  // The ranges, ascending.
  std::vector<Range> ranges() const;

  bool operator==(const RangeSet&) const = default;

 private:
  std::map<uint64_t, uint64_t> ranges_;  // begin -> end, disjoint, non-adjacent
  uint64_t bytes_ = 0;
};

}  // namespace lazyfs
