// lazyfs prepare on the real fixture: names moved under the mount point,
// everything else byte for byte, idempotent, undoable, and invisible to the
// catalog's original view.
#include <catch2/catch.hpp>

#include "lazyfs/catalog.h"
#include "lazyfs/image.h"
#include "lazyfs/prepare.h"
#include "test_util.h"

using namespace lazyfs;
using lazyfs::test::kFixture;
using lazyfs::test::read_bytes;
using lazyfs::test::ScratchDir;

namespace {

std::vector<std::vector<uint8_t>> entries(const std::filesystem::path& image) {
  auto reader = ImageReader::open(image, magic::kFiles);
  std::vector<std::vector<uint8_t>> out;
  ImageEntry e;
  while (reader.next(e)) out.emplace_back(e.payload.begin(), e.payload.end());
  return out;
}

}  // namespace

TEST_CASE("prepare moves missing files and directories under the mount point", "[prepare]") {
  ScratchDir dir("prep");
  test::copy_fixture(dir.path());
  const auto before = Catalog::load(dir.path());

  auto r = prepare_checkpoint(dir.path(), {"/lazyfs", false});
  CHECK(r.changed);
  // libc and the dynamic loader exist on this host; the rest do not.
  CHECK(r.left_alone == 2);
  CHECK(r.files_redirected == before.files().size() - 2);
  CHECK(r.dirs_redirected == 1);  // the cwd; "/" exists

  const auto live = Catalog::load(dir.path(), Catalog::Names::kAsIs);
  for (const auto& f : before.files()) {
    INFO(f.path);
    const bool moved = !exists_locally(f);
    CHECK((live.find_file("/lazyfs" + f.path) != nullptr) == moved);
    CHECK((live.find_file(f.path) != nullptr) == !moved);
    if (moved) {
      const auto* g = live.find_file("/lazyfs" + f.path);
      CHECK(g->size == f.size);
      CHECK(g->mode == f.mode);
      CHECK(g->openers.size() == f.openers.size());
    }
  }
  CHECK(live.dirs().at(0).path == "/lazyfs/srv/lazyfs-fixture-a/work");
  CHECK(live.skipped().size() == before.skipped().size());

  // Entries not moved keep their exact bytes (the pipe, /dev/null, libc).
  auto old_entries = entries(kFixture / "files.img");
  auto new_entries = entries(dir.path() / "files.img");
  REQUIRE(old_entries.size() == new_entries.size());
  size_t same = 0;
  for (size_t i = 0; i < old_entries.size(); ++i) same += old_entries[i] == new_entries[i];
  // In the fixture every moved path is named by one id: one entry each.
  CHECK(same == old_entries.size() - r.files_redirected - r.dirs_redirected);

  // The catalog still sees the source's paths and the same checkpoint.
  const auto after = Catalog::load(dir.path());
  CHECK(after.identity() == before.identity());
  CHECK(after.files().size() == before.files().size());
  CHECK(after.find_file("/srv/lazyfs-fixture-a/data/big.bin"));
}

TEST_CASE("prepare twice changes nothing, other options start from the original, undo restores",
          "[prepare]") {
  ScratchDir dir("prep2");
  test::copy_fixture(dir.path());
  REQUIRE(prepare_checkpoint(dir.path(), {"/lazyfs", false}).changed);
  const auto once = read_bytes(dir.path() / "files.img");
  CHECK_FALSE(prepare_checkpoint(dir.path(), {"/lazyfs/", false}).changed);
  CHECK(read_bytes(dir.path() / "files.img") == once);

  auto all = prepare_checkpoint(dir.path(), {"/mnt/lz", true});
  CHECK(all.changed);
  CHECK(all.left_alone == 0);
  const auto live = Catalog::load(dir.path(), Catalog::Names::kAsIs);
  CHECK(live.find_file("/mnt/lz/usr/lib/x86_64-linux-gnu/libc.so.6"));
  CHECK_FALSE(live.find_file("/lazyfs/srv/lazyfs-fixture-a/data/big.bin"));  // not stacked

  CHECK(undo_prepare(dir.path()));
  CHECK(read_bytes(dir.path() / "files.img") == read_bytes(kFixture / "files.img"));
  CHECK_FALSE(std::filesystem::exists(dir.path() / kPrepareMarker));
  CHECK_FALSE(undo_prepare(dir.path()));
}

TEST_CASE("a new dump over a prepared directory is read as it is", "[prepare]") {
  ScratchDir dir("prep3");
  test::copy_fixture(dir.path());
  REQUIRE(prepare_checkpoint(dir.path(), {"/lazyfs", false}).changed);
  std::filesystem::copy_file(kFixture / "files.img", dir.path() / "files.img",
                             std::filesystem::copy_options::overwrite_existing);
  const auto cat = Catalog::load(dir.path());
  CHECK(cat.files_image().filename() == "files.img");
  CHECK(prepare_checkpoint(dir.path(), {"/lazyfs", false}).changed);
}

TEST_CASE("prepare refuses a bad mount point", "[prepare]") {
  ScratchDir dir("prep4");
  test::copy_fixture(dir.path());
  CHECK_THROWS_WITH(prepare_checkpoint(dir.path(), {"relative", false}),
                    Catch::Contains("not absolute"));
  CHECK_THROWS_WITH(prepare_checkpoint(dir.path(), {"/", false}), Catch::Contains("must not be /"));
  CHECK_THROWS_WITH(prepare_checkpoint(dir.path(), {"/a/../b", false}), Catch::Contains(".."));
}
