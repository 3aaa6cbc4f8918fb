// Corrupted checkpoints: every one gives an ImageError naming the file and
// offset (or loads, where the damage leaves a valid image), none crashes.
#include <catch2/catch.hpp>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "lazyfs/catalog.h"
#include "lazyfs/image.h"
#include "test_util.h"

using namespace lazyfs;
using lazyfs::test::kFixture;
using lazyfs::test::read_bytes;
using lazyfs::test::ScratchDir;
using lazyfs::test::write_bytes;

namespace {

// Offsets at which the fixture's files.img could end and still be whole.
std::set<size_t> entry_boundaries(const std::vector<uint8_t>& bytes) {
  std::set<size_t> out{8};
  size_t pos = 8;
  while (pos + 4 <= bytes.size()) {
    uint32_t len;
    std::memcpy(&len, bytes.data() + pos, 4);
    pos += 4 + len;
    out.insert(pos);
  }
  return out;
}

void put_u32(std::vector<uint8_t>& bytes, size_t at, uint32_t v) {
  std::memcpy(bytes.data() + at, &v, 4);
}

// Loads `dir`; true if it loaded, false if it threw an ImageError about `image`.
bool loads(const std::filesystem::path& dir, const std::string& image) {
  try {
    Catalog::load(dir);
    return true;
  } catch (const ImageError& e) {
    CHECK(e.file().filename() == image);
    return false;
  }
}

}  // namespace

TEST_CASE("files.img truncated at every offset", "[image]") {
  ScratchDir dir("trunc");
  test::copy_fixture(dir.path());
  const auto original = read_bytes(kFixture / "files.img");
  const auto whole = entry_boundaries(original);
  for (size_t cut = 0; cut < original.size(); ++cut) {
    INFO("cut at " << cut);
    write_bytes(dir.path() / "files.img",
                {original.begin(), original.begin() + static_cast<long>(cut)});
    CHECK(loads(dir.path(), "files.img") == (whole.count(cut) == 1));
  }
}

TEST_CASE("remap-fpath.img and inventory.img truncated at every offset", "[image]") {
  for (const std::string name : {"remap-fpath.img", "inventory.img"}) {
    ScratchDir dir("trunc2");
    test::copy_fixture(dir.path());
    const auto original = read_bytes(kFixture / name);
    for (size_t cut = 0; cut < original.size(); ++cut) {
      INFO(name << " cut at " << cut);
      write_bytes(dir.path() / name, {original.begin(), original.begin() + static_cast<long>(cut)});
      // inventory.img carries only its own magic; the others the common one too.
      const bool whole = cut == (name == "inventory.img" ? 4u : 8u);
      CHECK(loads(dir.path(), name) == whole);
    }
  }
}

TEST_CASE("wrong magics are refused", "[image]") {
  ScratchDir dir("magic");
  test::copy_fixture(dir.path());
  const auto original = read_bytes(kFixture / "files.img");
  for (size_t i = 0; i < 8; ++i) {
    auto bytes = original;
    bytes[i] ^= 0x5a;
    write_bytes(dir.path() / "files.img", bytes);
    CHECK_THROWS_WITH(Catalog::load(dir.path()), Catch::Contains("magic"));
  }
  // A real image of another kind in the place of files.img.
  std::filesystem::copy_file(kFixture / "inventory.img", dir.path() / "files.img",
                             std::filesystem::copy_options::overwrite_existing);
  CHECK_THROWS_WITH(Catalog::load(dir.path()), Catch::Contains("wrong magic"));
}

TEST_CASE("huge and out-of-range entry lengths are refused before use", "[image]") {
  ScratchDir dir("huge");
  test::copy_fixture(dir.path());
  const auto original = read_bytes(kFixture / "files.img");
  for (uint32_t len :
       {0xffffffffu, 0x7fffffffu, kMaxEntryBytes + 1, static_cast<uint32_t>(original.size())}) {
    INFO("length " << len);
    auto bytes = original;
    put_u32(bytes, 8, len);
    write_bytes(dir.path() / "files.img", bytes);
    try {
      Catalog::load(dir.path());
      FAIL("loaded");
    } catch (const ImageError& e) {
      CHECK(e.offset() == 8);
      CHECK_THAT(e.what(), Catch::Contains("files.img: offset 8: entry length"));
    }
  }
  auto bytes = original;
  put_u32(bytes, 8, 0);  // an empty message lacks every required field
  write_bytes(dir.path() / "files.img", bytes);
  CHECK_THROWS_WITH(Catalog::load(dir.path()), Catch::Contains("not a valid file_entry"));
}

TEST_CASE("garbage and mutated images never crash", "[image]") {
  ScratchDir dir("garbage");
  test::copy_fixture(dir.path());
  const auto original = read_bytes(kFixture / "files.img");
  std::mt19937 rng(42);
  size_t loaded = 0;
  for (int round = 0; round < 3000; ++round) {
    auto bytes = original;
    if (round % 3 == 0) {
      // Random garbage after a valid header.
      bytes.resize(8 + rng() % 512);
      for (size_t i = 8; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(rng());
    } else {
      // A few flipped bytes anywhere past the magics.
      for (int k = 0; k < 1 + round % 4; ++k)
        bytes[8 + rng() % (bytes.size() - 8)] = static_cast<uint8_t>(rng());
    }
    write_bytes(dir.path() / "files.img", bytes);
    loaded += loads(dir.path(), "files.img");
  }
  // Most mutations of protobuf bytes still parse; what matters is no crash.
  SUCCEED("loaded " << loaded << " of 3000 mutated images without a crash");
}

TEST_CASE("lazyfs ls prints the catalog", "[cli]") {
  auto r = test::run_lazyfs({"ls", kFixture.string()});
  CHECK(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("-rw-r-----     16777216 /srv/lazyfs-fixture-a/data/big.bin"));
  CHECK_THAT(r.out, Catch::Contains("size not recorded: O_APPEND"));
  CHECK_THAT(r.out, Catch::Contains("11 files, "));
  CHECK_THAT(r.out, Catch::Contains("2 device, 2 directory, 1 ghost"));
}

TEST_CASE("lazyfs ls --json gives the documented object", "[cli]") {
  auto r = test::run_lazyfs({"ls", "--json", kFixture.string()});
  REQUIRE(r.status == 0);
  auto j = nlohmann::json::parse(r.out);
  CHECK(j["files"].size() == 11);
  uint64_t total = 0;
  for (const auto& f : j["files"]) {
    for (const char* key : {"path", "size", "mode", "ids", "local"}) CHECK(f.contains(key));
    if (!f["size"].is_null()) total += f["size"].get<uint64_t>();
    if (f["path"] == "/srv/lazyfs-fixture-a/logs/app.log") CHECK(f["size"].is_null());
  }
  CHECK(j["total_bytes"] == total);
  CHECK(j["dirs"].size() == 2);
  CHECK(j["skipped"].size() == 5);
  for (const auto& s : j["skipped"]) {
    for (const char* key : {"id", "path", "reason"}) CHECK(s.contains(key));
  }
}

TEST_CASE("lazyfs ls on bad input: one line on stderr and exit status 2", "[cli]") {
  ScratchDir dir("clibad");
  test::copy_fixture(dir.path());
  auto bytes = read_bytes(kFixture / "files.img");
  bytes.resize(100);
  write_bytes(dir.path() / "files.img", bytes);
  std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{"ls", "/nonexistent"}, "/nonexistent: checkpoint directory does not exist"},
      {{"ls", dir.path().string()}, "files.img: offset 88: entry length 72 runs past the end"},
      {{"ls"}, "IMGDIR is required"},
      {{"nosuchcommand"}, ""},
  };
  for (const auto& [args, message] : cases) {
    auto r = test::run_lazyfs(args);
    INFO(r.err);
    CHECK(r.status == 2);
    CHECK(r.out.empty());
    CHECK_THAT(r.err, Catch::StartsWith("lazyfs: ") && Catch::Contains(message));
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') <= 2);
  }
}
