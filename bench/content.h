// The bytes of the benchmark's source files: a pure function of (file seed,
// offset), so the harness can write gigabytes quickly, reuse them across
// methods and runs, and know what a reader must have seen without reading the
// files back. splitmix64's finaliser over the 8-byte word index: incompressible
// enough that SSH compression or sparse copies cannot cheat, and about a byte
// per cycle to generate.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace lazyfs::bench {

inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// FNV-1a of the file's checkpoint path: the file's seed.
inline uint64_t path_seed(std::string_view path) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : path) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

inline uint64_t content_word(uint64_t seed, uint64_t index) {
  return mix64(seed ^ (index * 0xd1b54a32d192ed03ull));
}

inline uint8_t content_byte(uint64_t seed, uint64_t offset) {
  return static_cast<uint8_t>(content_word(seed, offset / 8) >> (8 * (offset % 8)));
}

// Fills `out` with the file's bytes [offset, offset + size).
inline void fill_content(uint64_t seed, uint64_t offset, uint8_t* out, size_t size) {
  size_t i = 0;
  while (i < size && (offset + i) % 8 != 0) {
    out[i] = content_byte(seed, offset + i);
    ++i;
  }
  for (; i + 8 <= size; i += 8) {
    const uint64_t w = content_word(seed, (offset + i) / 8);
    std::memcpy(out + i, &w, 8);  // little-endian, as content_byte reads it
  }
  for (; i < size; ++i) out[i] = content_byte(seed, offset + i);
}

// What the workload reports for the bytes it read: their plain sum.
inline uint64_t byte_sum(const uint8_t* data, size_t size) {
  uint64_t sum = 0;
  for (size_t i = 0; i < size; ++i) sum += data[i];
  return sum;
}

}  // namespace lazyfs::bench
