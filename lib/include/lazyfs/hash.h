// SHA-256 (OpenSSL) for names that must be stable across runs and hosts:
// checkpoint identities and cache file names.
#pragma once

#include <string>
#include <string_view>

namespace lazyfs {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  Sha256& update(std::string_view data);
  // The 32-byte digest, raw or as hex; either ends the object's use.
  std::string digest();
  std::string hex();

 private:
  void* ctx_;
};

std::string sha256_hex(std::string_view data);

}  // namespace lazyfs
