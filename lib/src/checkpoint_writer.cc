#include "lazyfs/checkpoint_writer.h"

#include "criu/fdinfo.pb.h"
#include "criu/inventory.pb.h"
#include "criu/regfile.pb.h"
#include "lazyfs/image.h"

#include <cstring>

namespace lazyfs {

void write_checkpoint(const std::filesystem::path& dir, const std::vector<CheckpointFile>& files,
                      const std::string& run_id) {
  std::filesystem::create_directories(dir);

  criu::inventory_entry inv;
  inv.set_img_version(2);
  inv.set_dump_criu_run_id(run_id);
  // inventory.img carries only its own magic, as CRIU writes it.
  std::vector<uint8_t> inv_header(4);
  const uint32_t inv_magic = magic::kInventory;
  std::memcpy(inv_header.data(), &inv_magic, 4);
  write_image(dir / "inventory.img", inv_header, {inv.SerializeAsString()});

  std::vector<std::string> entries;
  uint32_t id = 1;
  for (const auto& f : files) {
    criu::file_entry fe;
    fe.set_type(1);  // REG
    fe.set_id(id);
    auto* reg = fe.mutable_reg();
    reg->set_id(id);
    reg->set_flags(f.flags);
    reg->set_pos(f.pos);
    auto* fown = reg->mutable_fown();
    fown->set_uid(0);
    fown->set_euid(0);
    fown->set_signum(0);
    fown->set_pid_type(0);
    fown->set_pid(0);
    reg->set_name(f.path);
    if (f.size) reg->set_size(*f.size);
    reg->set_mode(f.mode);
    entries.push_back(fe.SerializeAsString());
    ++id;
  }
  write_image(dir / "files.img", image_header(magic::kFiles), entries);
}

}  // namespace lazyfs
