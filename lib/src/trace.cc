#include "lazyfs/trace.h"

#include <fmt/core.h>

#include <charconv>
#include <fstream>

#include "lazyfs/fileio.h"
#include "lazyfs/paths.h"

namespace lazyfs {

namespace {

constexpr std::string_view kHeader = "lazyfs-trace 1";

bool parse_u64(std::string_view text, uint64_t& out) {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size() && !text.empty();
}

}  // namespace

std::vector<TraceRecord> read_trace(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw TraceError(fmt::format("{}: cannot read the trace", file.string()));
  std::vector<TraceRecord> out;
  std::string line;
  size_t number = 0;
  auto fail = [&](const std::string& what) {
    throw TraceError(fmt::format("{}:{}: {}", file.string(), number, what));
  };
  while (std::getline(in, line)) {
    ++number;
    if (number == 1) {
      if (line != kHeader)
        fail(fmt::format("not a lazyfs trace (the first line must be \"{}\")", kHeader));
      continue;
    }
    if (line.empty() || line.front() == '#') continue;
    std::string_view rest = line;
    auto take = [&]() {
      auto space = rest.find(' ');
      auto field = rest.substr(0, space);
      rest = space == std::string_view::npos ? std::string_view() : rest.substr(space + 1);
      return field;
    };
    TraceRecord r;
    if (!parse_u64(take(), r.offset)) fail("expected OFFSET LENGTH PATH: bad offset");
    if (!parse_u64(take(), r.length) || r.length == 0) {
      fail("expected OFFSET LENGTH PATH: bad length");
    }
    if (r.offset > UINT64_MAX - r.length) fail("offset + length overflows");
    r.path = std::string(rest);
    if (auto problem = path_problem(r.path)) fail("bad path: " + *problem);
    out.push_back(std::move(r));
  }
  if (number == 0) fail("empty file: not a lazyfs trace");
  return out;
}

TraceRecorder::TraceRecorder(std::filesystem::path file, std::chrono::seconds window,
                             uint64_t block_size)
    : file_(std::move(file)),
      deadline_(std::chrono::steady_clock::now() + window),
      block_size_(block_size) {}

void TraceRecorder::record(const std::string& path, uint64_t offset, uint64_t length) {
  // A name with a line break cannot be written as one record (it is a valid
  // file name, just not one this format can carry).
  if (length == 0 || path.find('\n') != std::string::npos) return;
  if (std::chrono::steady_clock::now() > deadline_) {
    std::string error;
    finish(error);
    return;
  }
  std::lock_guard lock(mutex_);
  if (finished_) return;
  for (uint64_t b = offset / block_size_; b <= (offset + length - 1) / block_size_; ++b) {
    if (!seen_.emplace(path, b).second) continue;
    // Consecutive blocks of one file read in order share one record.
    if (!records_.empty() && records_.back().path == path &&
        records_.back().offset + records_.back().length == b * block_size_) {
      records_.back().length += block_size_;
    } else {
      records_.push_back({path, b * block_size_, block_size_});
    }
  }
}

bool TraceRecorder::finish(std::string& error) {
  std::lock_guard lock(mutex_);
  if (finished_) return true;
  finished_ = true;
  std::string text = std::string(kHeader) + "\n";
  text += fmt::format("# block_size {}; {} records; OFFSET LENGTH PATH\n", block_size_,
                      records_.size());
  for (const auto& r : records_) text += fmt::format("{} {} {}\n", r.offset, r.length, r.path);
  if (auto ec = write_file_atomic(file_, text, 0644)) {
    error = fmt::format("cannot write trace {}: {}", file_.string(), ec.message());
    return false;
  }
  return true;
}

size_t TraceRecorder::records() const {
  std::lock_guard lock(mutex_);
  return records_.size();
}

}  // namespace lazyfs
