#include "lazyfs/paths.h"

#include <fmt/core.h>
#include <limits.h>

namespace lazyfs {

std::optional<std::string> path_problem(std::string_view path) {
  if (path.empty()) return "empty path";
  if (path.find('\0') != std::string_view::npos) return "path contains a NUL byte";
  if (path.size() >= PATH_MAX) {
    return fmt::format("path of {} bytes is longer than PATH_MAX ({})", path.size(), PATH_MAX);
  }
  if (path.front() != '/') return "path is not absolute";
  if (path == "/") return std::nullopt;
  size_t start = 1;
  while (true) {
    size_t end = path.find('/', start);
    auto comp = path.substr(start, end == std::string_view::npos ? end : end - start);
    if (comp.empty()) return "path has an empty component";
    if (comp == ".") return "path has a '.' component";
    if (comp == "..") return "path has a '..' component";
    if (comp.size() > NAME_MAX) {
      return fmt::format("path component of {} bytes is longer than NAME_MAX ({})", comp.size(),
                         NAME_MAX);
    }
    if (end == std::string_view::npos) return std::nullopt;
    start = end + 1;
  }
}

std::vector<std::string_view> path_components(std::string_view path) {
  std::vector<std::string_view> out;
  size_t start = 1;
  while (start < path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string_view::npos) end = path.size();
    out.push_back(path.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace lazyfs
