// The catalog against the real CRIU 4.2 fixture, with CRIU's own decoding
// (files.img.json, remap-fpath.img.json) as the expected values.
#include <fcntl.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "criu/fdinfo.pb.h"
#include "criu/regfile.pb.h"
#include "lazyfs/catalog.h"
#include "lazyfs/checkpoint_writer.h"
#include "lazyfs/image.h"
#include "test_util.h"

using namespace lazyfs;
using lazyfs::test::kFixture;
using lazyfs::test::ScratchDir;

namespace {

nlohmann::json load_json(const std::string& name) {
  std::ifstream in(kFixture / name);
  return nlohmann::json::parse(in);
}

struct Expected {
  std::map<std::string, std::pair<std::optional<uint64_t>, uint32_t>> files;  // size, mode
  std::map<std::string, std::set<uint32_t>> ids;
  std::map<std::string, uint32_t> dirs;
};

// What a restore opens, worked out from CRIU's own JSON decoding.
Expected expected_from_json() {
  std::set<uint32_t> ghosts;
  const auto remaps = load_json("remap-fpath.img.json");
  for (const auto& r : remaps["entries"]) {
    if (r["remap_type"] == "GHOST") ghosts.insert(r["orig_id"].get<uint32_t>());
  }
  Expected e;
  const auto files = load_json("files.img.json");
  for (const auto& fe : files["entries"]) {
    if (fe["type"] != "REG") continue;
    const auto& reg = fe["reg"];
    auto mode = reg["mode"].get<uint32_t>();
    auto name = reg["name"].get<std::string>();
    if (S_ISDIR(mode)) e.dirs[name] = mode;
    if (!S_ISREG(mode) || ghosts.count(reg["id"].get<uint32_t>())) continue;
    std::optional<uint64_t> size;
    if (reg.contains("size")) size = reg["size"].get<uint64_t>();
    e.files[name] = {size, mode};
    e.ids[name].insert(reg["id"].get<uint32_t>());
  }
  return e;
}

void check_matches_fixture(const Catalog& cat) {
  auto want = expected_from_json();
  REQUIRE(cat.files().size() == want.files.size());
  for (const auto& f : cat.files()) {
    INFO(f.path);
    REQUIRE(want.files.count(f.path) == 1);
    CHECK(f.size == want.files[f.path].first);
    REQUIRE(f.mode);
    CHECK(*f.mode == want.files[f.path].second);
    std::set<uint32_t> ids;
    for (const auto& o : f.openers) ids.insert(o.id);
    CHECK(ids == want.ids[f.path]);
  }
  REQUIRE(cat.dirs().size() == want.dirs.size());
  for (const auto& d : cat.dirs()) CHECK(want.dirs.at(d.path) == d.mode);
}

std::vector<std::string> fixture_payloads() {
  auto reader = ImageReader::open(kFixture / "files.img", magic::kFiles);
  std::vector<std::string> out;
  ImageEntry e;
  while (reader.next(e))
    out.emplace_back(reinterpret_cast<const char*>(e.payload.data()), e.payload.size());
  return out;
}

std::string file_entry(uint32_t id, const std::string& name, uint32_t mode,
                       std::optional<uint64_t> size) {
  criu::file_entry fe;
  fe.set_type(1);
  fe.set_id(id);
  auto* reg = fe.mutable_reg();
  reg->set_id(id);
  reg->set_flags(0);
  reg->set_pos(0);
  auto* fown = reg->mutable_fown();
  fown->set_uid(0);
  fown->set_euid(0);
  fown->set_signum(0);
  fown->set_pid_type(0);
  fown->set_pid(0);
  reg->set_name(name);
  reg->set_mode(mode);
  if (size) reg->set_size(*size);
  return fe.SerializeAsString();
}

}  // namespace

TEST_CASE("the CRIU 4.2 fixture gives exactly the files a restore opens", "[catalog]") {
  auto cat = Catalog::load(kFixture);
  check_matches_fixture(cat);

  // Spelled out too, so a mistake shared by the expectation code shows.
  CHECK(cat.files().size() == 11);
  const auto* big = cat.find_file("/srv/lazyfs-fixture-a/data/big.bin");
  REQUIRE(big);
  CHECK(big->size == 16u << 20);
  CHECK(*big->mode == (S_IFREG | 0640));
  const auto* log = cat.find_file("/srv/lazyfs-fixture-a/logs/app.log");
  REQUIRE(log);
  CHECK_FALSE(log->size);  // O_APPEND writer: CRIU records no size
  CHECK((log->openers.at(0).flags & O_APPEND) != 0);
  CHECK(cat.find_file("/tmp/migrant")->has_build_id);
  CHECK_FALSE(cat.find_file("/srv/lazyfs-fixture-a/data/mapped.bin")->has_build_id);
  CHECK(cat.find_file("/srv/lazyfs-fixture-a/work/out.log")->openers.at(0).pos == 323);
  CHECK(cat.find_file("/srv/lazyfs-fixture-a/data/dir.with.dots/file name with spaces.txt"));
  CHECK_FALSE(cat.find_file("/srv/lazyfs-fixture-a/tmp/deleted.bin"));
  CHECK_FALSE(cat.find_file("/dev/null"));

  std::map<uint32_t, std::string> reasons;
  for (const auto& s : cat.skipped()) reasons[s.id] = s.reason;
  CHECK(reasons ==
        std::map<uint32_t, std::string>{
            {6, "device"}, {13, "ghost"}, {14, "device"}, {16, "directory"}, {17, "directory"}});
  CHECK(cat.identity().size() == 64);
}

TEST_CASE("the identity tells checkpoints apart and is stable", "[catalog]") {
  ScratchDir a("ida"), b("idb");
  test::copy_fixture(a.path());
  test::copy_fixture(b.path());
  CHECK(Catalog::load(a.path()).identity() == Catalog::load(kFixture).identity());
  auto payloads = fixture_payloads();
  payloads.pop_back();
  write_image(b.path() / "files.img", image_header(magic::kFiles), payloads);
  CHECK(Catalog::load(b.path()).identity() != Catalog::load(a.path()).identity());
}

TEST_CASE("a legacy reg-files.img is read when there is no files.img", "[catalog]") {
  ScratchDir dir("legacy");
  test::copy_fixture(dir.path());
  std::filesystem::remove(dir.path() / "files.img");
  std::vector<std::string> regs;
  for (const auto& p : fixture_payloads()) {
    criu::file_entry fe;
    REQUIRE(fe.ParseFromString(p));
    if (fe.type() == 1) regs.push_back(fe.reg().SerializeAsString());
  }
  write_image(dir.path() / "reg-files.img", image_header(magic::kRegFiles), regs);
  auto cat = Catalog::load(dir.path());
  CHECK(cat.files_image().filename() == "reg-files.img");
  check_matches_fixture(cat);

  // Version 1 images carry no common magic.
  uint32_t m = magic::kRegFiles;
  std::vector<uint8_t> v1(4);
  std::memcpy(v1.data(), &m, 4);
  write_image(dir.path() / "reg-files.img", v1, regs);
  check_matches_fixture(Catalog::load(dir.path()));
}

TEST_CASE("several ids naming one path give one file with every id", "[catalog]") {
  ScratchDir dir("dups");
  std::vector<std::string> p{file_entry(8, "/srv/big.bin", S_IFREG | 0640, 4096),
                             file_entry(20, "/srv/big.bin", S_IFREG | 0640, 4096),
                             file_entry(21, "/srv/big.bin", S_IFREG | 0600, 4096),
                             file_entry(22, "/srv/cwd", S_IFDIR | 0700, std::nullopt),
                             file_entry(23, "/srv/cwd", S_IFDIR | 0700, std::nullopt)};
  write_image(dir.path() / "files.img", image_header(magic::kFiles), p);
  auto cat = Catalog::load(dir.path());
  REQUIRE(cat.files().size() == 1);
  CHECK(cat.files()[0].openers.size() == 2);
  REQUIRE(cat.dirs().size() == 1);
  CHECK(cat.dirs()[0].ids == std::vector<uint32_t>{22, 23});
  CHECK(cat.skipped().at(0).reason == "conflict");
}

TEST_CASE("unclean paths are skipped with their reason and never served", "[catalog]") {
  ScratchDir dir("badpaths");
  std::vector<std::string> bad{"relative/x",
                               "/a/../../etc/shadow",
                               "/a//b",
                               "/a/./b",
                               "",
                               std::string("/a\0b", 4),
                               "/" + std::string(300, 'x'),
                               "/a/"};
  std::vector<std::string> p;
  uint32_t id = 1;
  for (const auto& b : bad) p.push_back(file_entry(id++, b, S_IFREG | 0644, 1));
  p.push_back(file_entry(id++, "/ok", S_IFREG | 0644, 1));
  p.push_back(file_entry(id++, "/proc/self/status", S_IFREG | 0444, 0));
  write_image(dir.path() / "files.img", image_header(magic::kFiles), p);
  auto cat = Catalog::load(dir.path());
  REQUIRE(cat.files().size() == 1);
  CHECK(cat.files()[0].path == "/ok");
  size_t invalid = 0;
  for (const auto& s : cat.skipped()) {
    if (s.reason == "invalid-path") {
      ++invalid;
      CHECK_FALSE(s.detail.empty());
    }
  }
  CHECK(invalid == bad.size());
  CHECK(cat.skipped().back().reason == "pseudo-fs");
}

TEST_CASE("missing directories and images are clear errors", "[catalog]") {
  CHECK_THROWS_WITH(Catalog::load("/nonexistent/lazyfs"),
                    Catch::Contains("checkpoint directory does not exist"));
  ScratchDir dir("empty");
  CHECK_THROWS_WITH(Catalog::load(dir.path()), Catch::Contains("no files.img or reg-files.img"));
  CHECK_THROWS_WITH(Catalog::load(kFixture / "files.img"), Catch::Contains("not a directory"));
}

TEST_CASE("a checkpoint written by write_checkpoint reads back", "[catalog]") {
  ScratchDir dir("writer");
  write_checkpoint(dir.path() / "ckpt",
                   {{"/srv/a.bin", 1000, S_IFREG | 0640, 0, 0},
                    {"/srv/logs/app.log", std::nullopt, S_IFREG | 0644, O_WRONLY | O_APPEND, 0},
                    {"/srv/work", std::nullopt, S_IFDIR | 0755, 0, 0}},
                   "run-1");
  auto cat = Catalog::load(dir.path() / "ckpt");
  REQUIRE(cat.files().size() == 2);
  CHECK(cat.files()[0].size == 1000u);
  CHECK(*cat.files()[0].mode == (S_IFREG | 0640));
  CHECK_FALSE(cat.files()[1].size);
  REQUIRE(cat.dirs().size() == 1);
  CHECK(cat.dirs()[0].path == "/srv/work");
  write_checkpoint(dir.path() / "other", {{"/srv/a.bin", 1000, S_IFREG | 0640, 0, 0}}, "run-2");
  CHECK(Catalog::load(dir.path() / "other").identity() != cat.identity());
}
