#include "cancellation.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <system_error>

namespace lazyfs::detail {

Cancellation::Cancellation() : event_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!event_) throw std::system_error(errno, std::system_category(), "eventfd");
}

void Cancellation::cancel() {
  std::lock_guard lock(mu_);
  if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
  const uint64_t one = 1;
  // Cannot fail: the counter is far from its maximum.
  [[maybe_unused]] auto n = ::write(event_.get(), &one, sizeof one);
  for (int socket : sockets_) ::shutdown(socket, SHUT_RDWR);
}

void Cancellation::add_socket(int socket) {
  std::lock_guard lock(mu_);
  sockets_.push_back(socket);
  if (cancelled()) ::shutdown(socket, SHUT_RDWR);
}

void Cancellation::remove_socket(int socket) {
  std::lock_guard lock(mu_);
  std::erase(sockets_, socket);
}

}  // namespace lazyfs::detail
