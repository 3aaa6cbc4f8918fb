// Which names lazyfs lets through to a file system: clean absolute paths only.
// A checkpoint is input from another host; a name with "..", an empty
// component or a NUL in it must never reach open(2) or the mount's tree.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lazyfs {

// Why `path` is not a clean absolute path, or nullopt when it is. "/" is clean.
std::optional<std::string> path_problem(std::string_view path);

// The components of a clean absolute path ("/a/b" gives {"a", "b"}; "/" none).
std::vector<std::string_view> path_components(std::string_view path);

}  // namespace lazyfs
