// Test-only: makes the SFTP source predict a wrong handle for an OPEN, as a
// server that numbers its handles otherwise than OpenSSH's would, so that the
// tests can check what happens then against a real sftp-server. False, and so
// free, in production.
#pragma once

#include <atomic>

namespace lazyfs::sftp_hooks {

extern std::atomic<bool> mispredict_handles;

}  // namespace lazyfs::sftp_hooks
