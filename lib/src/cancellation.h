// Cancellation: ends a source's waits at once when the source is cancelled
// (shutdown). A session that polls can poll fd() beside its socket; one that
// blocks inside a library (libssh2, libcurl) registers its sockets here, and
// they are shut down instead, which wakes the library with an error.
#pragma once

#include <atomic>
#include <mutex>
#include <vector>

#include "lazyfs/fileio.h"

namespace lazyfs::detail {

class Cancellation {
 public:
  Cancellation();
  Cancellation(const Cancellation&) = delete;
  Cancellation& operator=(const Cancellation&) = delete;

  // Readable once cancelled.
  int fd() const { return event_.get(); }
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }
  void cancel();
  // `socket` stays open until remove_socket(); shut down at once if the
  // source is already cancelled.
  void add_socket(int socket);
  void remove_socket(int socket);

 private:
  UniqueFd event_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::vector<int> sockets_;  // guarded by mu_
};

}  // namespace lazyfs::detail
