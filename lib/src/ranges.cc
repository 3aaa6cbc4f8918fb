#include "lazyfs/ranges.h"

#include <algorithm>
#include <iterator>

namespace lazyfs {

namespace {

using RangeMap = std::map<uint64_t, uint64_t>;

// The first range that ends after `offset`, i.e. the first one that can hold
// `offset` or lie wholly after it.
RangeMap::const_iterator first_ending_after(const RangeMap& ranges, uint64_t offset) {
  auto it = ranges.upper_bound(offset);
  if (it != ranges.begin()) {
    auto prev = std::prev(it);
    if (prev->second > offset) return prev;
  }
  return it;
}

// Calls `f(piece)` for each non-empty piece of `r` in the set, ascending.
template <typename F>
void for_each_overlap(const RangeMap& ranges, Range r, F&& f) {
  if (r.empty()) return;
  for (auto it = first_ending_after(ranges, r.begin); it != ranges.end() && it->first < r.end;
       ++it) {
    f(Range{std::max(it->first, r.begin), std::min(it->second, r.end)});
  }
}

}  // namespace

void RangeSet::insert(Range r) {
  if (r.empty()) return;
  // Start at the first range that overlaps or touches r (ends at or after its
  // begin) and swallow every range that starts at or before its end.
  auto it = ranges_.upper_bound(r.begin);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= r.begin) it = prev;
  }
  uint64_t begin = r.begin;
  uint64_t end = r.end;
  while (it != ranges_.end() && it->first <= end) {
    begin = std::min(begin, it->first);
    end = std::max(end, it->second);
    bytes_ -= it->second - it->first;
    it = ranges_.erase(it);
  }
  ranges_.emplace_hint(it, begin, end);
  bytes_ += end - begin;
}

void RangeSet::erase(Range r) {
  if (r.empty()) return;
  auto it = ranges_.upper_bound(r.begin);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second > r.begin) it = prev;
  }
  // Only the first overlapped range can stick out on the left and only the
  // last on the right; they are put back trimmed once the loop is done.
  Range left;
  Range right;
  while (it != ranges_.end() && it->first < r.end) {
    if (it->first < r.begin) left = {it->first, r.begin};
    if (it->second > r.end) right = {r.end, it->second};
    bytes_ -= it->second - it->first;
    it = ranges_.erase(it);
  }
  if (!right.empty()) {
    it = ranges_.emplace_hint(it, right.begin, right.end);
    bytes_ += right.size();
  }
  if (!left.empty()) {
    ranges_.emplace_hint(it, left.begin, left.end);
    bytes_ += left.size();
  }
}

bool RangeSet::contains(Range r) const {
  if (r.empty()) return true;
  auto it = ranges_.upper_bound(r.begin);
  if (it == ranges_.begin()) return false;
  --it;
  return it->second >= r.end;
}

std::vector<Range> RangeSet::missing(Range r) const {
  std::vector<Range> out;
  if (r.empty()) return out;
  uint64_t cursor = r.begin;
  for_each_overlap(ranges_, r, [&](Range piece) {
    if (piece.begin > cursor) out.push_back({cursor, piece.begin});
    cursor = piece.end;
  });
  if (cursor < r.end) out.push_back({cursor, r.end});
  return out;
}

std::vector<Range> RangeSet::intersect(Range r) const {
  std::vector<Range> out;
  for_each_overlap(ranges_, r, [&](Range piece) { out.push_back(piece); });
  return out;
}

uint64_t RangeSet::bytes_in(Range r) const {
  uint64_t n = 0;
  for_each_overlap(ranges_, r, [&](Range piece) { n += piece.size(); });
  return n;
}

void RangeSet::clear() {
  ranges_.clear();
  bytes_ = 0;
}

std::vector<Range> RangeSet::ranges() const {
  std::vector<Range> out;
  out.reserve(ranges_.size());
  for (const auto& [begin, end] : ranges_) out.push_back({begin, end});
  return out;
}

}  // namespace lazyfs
