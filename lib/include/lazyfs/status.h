// Status: the result of an operation that can fail for a reason worth
// telling a user. Carries a positive errno (what a FUSE reply will carry), a
// one-line message saying why, and whether trying again may help.
#pragma once

#include <string>
#include <utility>

namespace lazyfs {

class [[nodiscard]] Status {
 public:
  Status() = default;  // success

  // A failure that may go away (network down, time-out): worth a retry.
  static Status transient(int errnum, std::string message) {
    return Status(errnum, std::move(message), true);
  }
  // A failure that a retry will not mend (no such file, refused host key).
  static Status permanent(int errnum, std::string message) {
    return Status(errnum, std::move(message), false);
  }

  bool ok() const { return errnum_ == 0; }
  int errnum() const { return errnum_; }
  bool retryable() const { return retryable_; }
  const std::string& message() const { return message_; }

 private:
  Status(int errnum, std::string message, bool retryable)
      : errnum_(errnum), retryable_(retryable), message_(std::move(message)) {}

  int errnum_ = 0;
  bool retryable_ = false;
  std::string message_;
};

}  // namespace lazyfs
