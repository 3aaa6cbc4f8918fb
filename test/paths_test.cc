#include <limits.h>
#include <catch2/catch.hpp>

#include "lazyfs/paths.h"

using lazyfs::path_components;
using lazyfs::path_problem;

TEST_CASE("clean absolute paths pass", "[paths]") {
  for (const char* p : {"/", "/a", "/srv/app/data/big.bin", "/a/b c/d.e", "/..a/a..", "/.hidden"}) {
    INFO(p);
    CHECK_FALSE(path_problem(p));
  }
}

TEST_CASE("unclean paths are rejected with a reason", "[paths]") {
  CHECK(*path_problem("") == "empty path");
  CHECK(*path_problem("a/b") == "path is not absolute");
  CHECK(*path_problem("/a//b") == "path has an empty component");
  CHECK(*path_problem("/a/") == "path has an empty component");
  CHECK(*path_problem("/a/./b") == "path has a '.' component");
  CHECK(*path_problem("/.") == "path has a '.' component");
  CHECK(*path_problem("/a/../b") == "path has a '..' component");
  CHECK(*path_problem("/..") == "path has a '..' component");
  CHECK(*path_problem(std::string("/a\0b", 4)) == "path contains a NUL byte");
  CHECK(path_problem("/" + std::string(NAME_MAX + 1, 'x'))->find("NAME_MAX") != std::string::npos);
  std::string long_path;
  while (long_path.size() < PATH_MAX) long_path += "/abcdefgh";
  CHECK(path_problem(long_path)->find("PATH_MAX") != std::string::npos);
}

TEST_CASE("components of a clean path", "[paths]") {
  CHECK(path_components("/").empty());
  CHECK(path_components("/a/b c/d") == std::vector<std::string_view>{"a", "b c", "d"});
}
