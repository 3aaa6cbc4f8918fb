// HttpSource drives libcurl's easy interface, one handle per pooled
// connection, and decides at the response headers whether the body that
// follows may reach the sink.
//
// Why decide there: a server that ignores Range (or whose file changed, so
// that If-Range fails) answers 200 and sends the whole file. Deciding only
// once the transfer ends would download it; returning 0 from the header
// callback aborts the transfer before a byte of the body is read, and curl
// closes that connection.
//
// Stalls: CURLOPT_LOW_SPEED_TIME counts whole seconds and averages the speed
// over a window, so a transfer that stops after a fast start is noticed
// seconds late. The progress callback, which curl calls at least once a
// second, fails a request whose byte count has not moved for stall_timeout
// once its connection is up (the connect phase has its own time-out).
//
// Lock order: mu_ (the pool) and validators_mu_ are never held together and
// never across network I/O; a checked-out Connection is owned by one thread.
#include "lazyfs/http_source.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cancellation.h"
#include "lazyfs/log.h"

#ifndef LAZYFS_VERSION
#define LAZYFS_VERSION "0"
#endif

namespace lazyfs {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::string_view kLog = "http";

// curl's receive buffer: the largest chunk handed to the sink at once.
constexpr long kBufferBytes = 256 * 1024;
// An error answer's body is read and dropped up to this size, so that its
// connection can serve the next request; a longer one closes the connection.
constexpr uint64_t kMaxDiscard = 64 * 1024;
constexpr long kMaxRedirects = 5;

void init_curl_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      log::error(kLog, "curl_global_init failed");
      std::abort();
    }
  });
}

std::string errno_text(int errnum) {
  return std::system_category().message(errnum);
}

// What every connection of a source needs, resolved once.
struct Settings {
  std::string origin;  // scheme://host[:port], no credentials
  std::string prefix;  // put before every image path; no trailing slash
  std::string uri;     // origin + prefix, for describe() and messages
  std::string user;
  std::string password;
  bool credentials = false;
  bool https = false;
  unsigned connections = 4;
  std::string ca_file;
  bool insecure = false;
  std::chrono::milliseconds connect_timeout{};
  std::chrono::milliseconds stall_timeout{};
  std::string user_agent;
};

// What the first stat of a path saw; every read insists on the same file.
struct Validator {
  std::string etag;           // as the server wrote it, quotes and all
  std::string last_modified;  // likewise
  std::optional<uint64_t> size;
};

bool strong_etag(const std::string& etag) {
  return !etag.empty() && etag.rfind("W/", 0) != 0;
}

// Percent-encodes all but RFC 3986's unreserved characters and '/', so that
// any byte of a path names the same file on the server.
std::string encode_path(std::string_view path) {
  constexpr std::string_view kHex = "0123456789ABCDEF";
  std::string out;
  out.reserve(path.size() + 8);
  for (char c : path) {
    const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '-' || c == '.' || c == '_' || c == '~' || c == '/';
    if (keep) {
      out += c;
    } else {
      const auto u = static_cast<unsigned char>(c);
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 0xf];
    }
  }
  return out;
}

std::string_view trim(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() &&
         (v.back() == ' ' || v.back() == '\t' || v.back() == '\r' || v.back() == '\n'))
    v.remove_suffix(1);
  return v;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
           return lower(x) == lower(y);
         });
}

std::optional<uint64_t> parse_u64(std::string_view v) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), value);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size()) return std::nullopt;
  return value;
}

// "bytes FIRST-LAST/TOTAL" (206) or "bytes */TOTAL" (416); TOTAL may be "*".
struct ContentRange {
  std::optional<uint64_t> first;
  std::optional<uint64_t> last;
  std::optional<uint64_t> total;
};

bool parse_content_range(std::string_view v, ContentRange& out) {
  if (v.size() < 6 || !iequals(v.substr(0, 6), "bytes ")) return false;
  v = trim(v.substr(6));
  auto slash = v.find('/');
  if (slash == std::string_view::npos) return false;
  auto range = v.substr(0, slash);
  auto total = v.substr(slash + 1);
  if (total != "*") {
    out.total = parse_u64(total);
    if (!out.total) return false;
  }
  if (range == "*") return true;
  auto dash = range.find('-');
  if (dash == std::string_view::npos) return false;
  out.first = parse_u64(range.substr(0, dash));
  out.last = parse_u64(range.substr(dash + 1));
  return out.first && out.last && *out.first <= *out.last;
}

// The headers of one answer. A request may see several (100 Continue,
// redirects); only the final one is acted on.
struct Response {
  long code = 0;
  std::optional<uint64_t> content_length;
  std::string content_range;
  std::string content_type;
  std::string etag;
  std::string last_modified;
  bool location = false;
};

// One request and what came back, shared with curl's callbacks.
struct Transfer {
  CURL* easy = nullptr;
  const Settings* s = nullptr;
  const std::atomic<bool>* cancelled = nullptr;  // the source's: ends the transfer
  std::string path;                              // the image path, for messages
  // A GET of [offset, offset + length) when `ranged`, else a HEAD.
  bool ranged = false;
  uint64_t offset = 0;
  uint64_t length = 0;
  const Validator* expect = nullptr;  // null: the path was never seen
  const ChunkSink* sink = nullptr;

  Response resp;
  bool final = false;       // `resp` holds the final answer's headers
  bool accepted = false;    // its body is the bytes asked for: to the sink
  uint64_t body_bytes = 0;  // how many bytes an accepted body carries
  uint64_t delivered = 0;
  uint64_t discarded = 0;
  Status refusal;                     // why a callback stopped the transfer
  std::exception_ptr callback_error;  // thrown in a callback, rethrown after
  Clock::time_point started;
  Clock::time_point last_progress;
  curl_off_t progress_bytes = -1;
  bool stalled = false;

  bool header_line(std::string_view line);
  bool end_of_headers();
  bool check_partial();
  bool check_whole();
  std::string changed_reason() const;
  Status changed(const std::string& why) const;
  Status protocol_error(const std::string& what) const;
};

std::string last_byte(uint64_t offset, uint64_t length) {
  return std::to_string(length > UINT64_MAX - offset ? UINT64_MAX - 1 : offset + length - 1);
}

Status Transfer::protocol_error(const std::string& what) const {
  return Status::permanent(EPROTO,
                           fmt::format("HTTP protocol error for {} on {}: {}", path, s->uri, what));
}

Status Transfer::changed(const std::string& why) const {
  return Status::permanent(ESTALE,
                           fmt::format("{} on {} changed on the server ({}); refusing to mix two "
                                       "versions of it",
                                       path, s->uri, why));
}

// Why the answer is not the file the first stat saw, or "".
std::string Transfer::changed_reason() const {
  if (!expect) return {};
  if (!expect->etag.empty() && !resp.etag.empty() && resp.etag != expect->etag) {
    return fmt::format("ETag {} at the first stat, now {}", expect->etag, resp.etag);
  }
  if (!expect->last_modified.empty() && !resp.last_modified.empty() &&
      resp.last_modified != expect->last_modified) {
    return fmt::format("Last-Modified {} at the first stat, now {}", expect->last_modified,
                       resp.last_modified);
  }
  return {};
}

bool Transfer::header_line(std::string_view line) {
  if (line.rfind("HTTP/", 0) == 0) {
    // A new answer begins: forget the headers of any before it.
    resp = Response{};
    final = false;
    auto space = line.find(' ');
    if (space != std::string_view::npos) {
      auto code = trim(line.substr(space + 1)).substr(0, 3);
      resp.code = static_cast<long>(parse_u64(code).value_or(0));
    }
    return true;
  }
  if (trim(line).empty()) return end_of_headers();
  auto colon = line.find(':');
  if (colon == std::string_view::npos) return true;
  auto name = trim(line.substr(0, colon));
  auto value = trim(line.substr(colon + 1));
  if (iequals(name, "content-length")) {
    resp.content_length = parse_u64(value);
  } else if (iequals(name, "content-range")) {
    resp.content_range = value;
  } else if (iequals(name, "content-type")) {
    resp.content_type = value;
  } else if (iequals(name, "etag")) {
    resp.etag = value;
  } else if (iequals(name, "last-modified")) {
    resp.last_modified = value;
  } else if (iequals(name, "location")) {
    resp.location = true;
  }
  return true;
}

bool Transfer::end_of_headers() {
  if (final) return true;            // trailers after a chunked body
  if (resp.code < 200) return true;  // 100 Continue and the like: the answer follows
  if (resp.code >= 300 && resp.code < 400 && resp.location) return true;  // curl follows it
  final = true;
  if (!ranged) return true;
  if (resp.code == 206) return check_partial();
  if (resp.code == 200) return check_whole();
  return true;  // an error: its body is dropped and the code mapped afterwards
}

bool Transfer::check_partial() {
  if (resp.content_type.rfind("multipart/", 0) == 0) {
    refusal = protocol_error("a multipart answer to a single range");
    return false;
  }
  ContentRange cr;
  if (!parse_content_range(resp.content_range, cr) || !cr.first) {
    refusal = protocol_error(fmt::format("206 with Content-Range \"{}\" for bytes {}-{}",
                                         resp.content_range, offset, last_byte(offset, length)));
    return false;
  }
  if (auto why = changed_reason(); !why.empty()) {
    refusal = changed(why);
    return false;
  }
  if (expect && expect->size && cr.total && *cr.total != *expect->size) {
    refusal = changed(fmt::format("size {} at the first stat, now {}", *expect->size, *cr.total));
    return false;
  }
  const uint64_t want_last = length > UINT64_MAX - offset ? UINT64_MAX - 1 : offset + length - 1;
  const uint64_t expect_last = cr.total ? std::min(want_last, *cr.total - 1) : want_last;
  const uint64_t bytes = *cr.last - *cr.first + 1;
  if (*cr.first != offset || *cr.last != expect_last ||
      (resp.content_length && *resp.content_length != bytes)) {
    refusal = protocol_error(fmt::format("asked for bytes {}-{}, got Content-Range \"{}\"", offset,
                                         want_last, resp.content_range));
    return false;
  }
  accepted = true;
  body_bytes = bytes;
  return true;
}

// A 200 to a ranged GET: the server ignores Range, or the file changed and
// If-Range sent it whole. Either way its body is not read, unless it is
// exactly what was asked for (a file no longer than the range, from 0).
bool Transfer::check_whole() {
  if (auto why = changed_reason(); !why.empty()) {
    refusal = changed(why);
    return false;
  }
  if (expect && expect->size && resp.content_length && *resp.content_length != *expect->size) {
    refusal = changed(
        fmt::format("size {} at the first stat, now {}", *expect->size, *resp.content_length));
    return false;
  }
  // Taken only with the validators the stat saw: an answer without them
  // cannot show that the file is still the same.
  const bool same =
      !expect || ((expect->etag.empty() || resp.etag == expect->etag) &&
                  (expect->last_modified.empty() || resp.last_modified == expect->last_modified));
  if (same && offset == 0 && resp.content_length && *resp.content_length <= length) {
    accepted = true;
    body_bytes = *resp.content_length;
    return true;
  }
  refusal = Status::permanent(
      EOPNOTSUPP, fmt::format("{} ignores Range requests (it answered a GET of bytes {}-{} of {} "
                              "with the whole file); refusing to download whole files",
                              s->origin, offset, last_byte(offset, length), path));
  return false;
}

// curl's callbacks. None lets an exception out into C.
size_t on_header(char* data, size_t size, size_t count, void* user) {
  auto& t = *static_cast<Transfer*>(user);
  const size_t n = size * count;
  try {
    return t.header_line(std::string_view(data, n)) ? n : 0;
  } catch (...) {
    t.callback_error = std::current_exception();
    return 0;
  }
}

size_t on_body(char* data, size_t size, size_t count, void* user) {
  auto& t = *static_cast<Transfer*>(user);
  const size_t n = size * count;
  if (!t.accepted) {
    t.discarded += n;
    return t.discarded <= kMaxDiscard ? n : 0;
  }
  if (n > t.body_bytes - t.delivered) {
    t.refusal = t.protocol_error(fmt::format("more than the {} bytes announced", t.body_bytes));
    return 0;
  }
  try {
    (*t.sink)(t.offset + t.delivered,
              std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), n));
  } catch (...) {
    t.callback_error = std::current_exception();
    return 0;
  }
  t.delivered += n;
  return n;
}

int on_progress(void* user, curl_off_t, curl_off_t dlnow, curl_off_t, curl_off_t ulnow) {
  auto& t = *static_cast<Transfer*>(user);
  if (t.cancelled && t.cancelled->load(std::memory_order_acquire)) {
    t.refusal = shutting_down();
    return 1;
  }
  const auto now = Clock::now();
  curl_off_t pretransfer = 0;
  curl_easy_getinfo(t.easy, CURLINFO_PRETRANSFER_TIME_T, &pretransfer);
  if (pretransfer == 0) {
    // Still connecting: CURLOPT_CONNECTTIMEOUT_MS bounds that. The check
    // below is a backstop should curl ever not report the connection up.
    t.last_progress = now;
    if (now - t.started > t.s->connect_timeout + t.s->stall_timeout) {
      t.stalled = true;
      return 1;
    }
    return 0;
  }
  const curl_off_t bytes = dlnow + ulnow;
  if (bytes != t.progress_bytes) {
    t.progress_bytes = bytes;
    t.last_progress = now;
    return 0;
  }
  if (now - t.last_progress >= t.s->stall_timeout) {
    t.stalled = true;
    return 1;
  }
  return 0;
}

template <typename T>
void set(CURL* easy, CURLoption option, T value) {
  // Options set here are all supported by the libcurl we build against; a
  // failure is a bug, not a condition to handle.
  if (curl_easy_setopt(easy, option, value) != CURLE_OK) {
    log::error(kLog, "curl_easy_setopt {} failed", static_cast<int>(option));
    std::abort();
  }
}

// curl's sockets are made here so that a cancel can shut them down: curl
// then wakes at once instead of at its next progress call (up to a second
// later, on a stalled transfer).
curl_socket_t open_socket(void* cancellation, curlsocktype, curl_sockaddr* address) {
  const int fd = ::socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
  if (fd < 0) return CURL_SOCKET_BAD;
  static_cast<detail::Cancellation*>(cancellation)->add_socket(fd);
  return fd;
}

int close_socket(void* cancellation, curl_socket_t fd) {
  static_cast<detail::Cancellation*>(cancellation)->remove_socket(fd);
  return ::close(fd);
}

// One curl easy handle and the keep-alive connection it holds between
// requests. Not thread-safe: owned by whoever checked it out of the pool.
// `cancellation` outlives it.
class Connection {
 public:
  Connection(const Settings& s, detail::Cancellation& cancellation) : easy_(curl_easy_init()) {
    if (!easy_) return;
    set(easy_, CURLOPT_NOSIGNAL, 1L);
    set(easy_, CURLOPT_OPENSOCKETFUNCTION, &open_socket);
    set(easy_, CURLOPT_OPENSOCKETDATA, static_cast<void*>(&cancellation));
    set(easy_, CURLOPT_CLOSESOCKETFUNCTION, &close_socket);
    set(easy_, CURLOPT_CLOSESOCKETDATA, static_cast<void*>(&cancellation));
    set(easy_, CURLOPT_ERRORBUFFER, errbuf_.data());
    set(easy_, CURLOPT_PROTOCOLS_STR, "http,https");
    set(easy_, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    set(easy_, CURLOPT_FOLLOWLOCATION, 1L);
    set(easy_, CURLOPT_MAXREDIRS, kMaxRedirects);
    set(easy_, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(s.connect_timeout.count()));
    set(easy_, CURLOPT_TCP_KEEPALIVE, 1L);
    set(easy_, CURLOPT_BUFFERSIZE, kBufferBytes);
    set(easy_, CURLOPT_USERAGENT, s.user_agent.c_str());
    // The URL is built with every byte encoded as it must be: send it as is.
    set(easy_, CURLOPT_PATH_AS_IS, 1L);
    set(easy_, CURLOPT_HEADERFUNCTION, &on_header);
    set(easy_, CURLOPT_WRITEFUNCTION, &on_body);
    set(easy_, CURLOPT_XFERINFOFUNCTION, &on_progress);
    set(easy_, CURLOPT_NOPROGRESS, 0L);
    if (s.credentials) {
      set(easy_, CURLOPT_USERNAME, s.user.c_str());
      set(easy_, CURLOPT_PASSWORD, s.password.c_str());
    }
    if (!s.ca_file.empty()) set(easy_, CURLOPT_CAINFO, s.ca_file.c_str());
    if (s.insecure) {
      set(easy_, CURLOPT_SSL_VERIFYPEER, 0L);
      set(easy_, CURLOPT_SSL_VERIFYHOST, 0L);
    }
  }
  ~Connection() {
    if (easy_) curl_easy_cleanup(easy_);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  bool valid() const { return easy_ != nullptr; }
  CURL* easy() const { return easy_; }
  std::string error_text(CURLcode rc) const {
    return errbuf_[0] ? std::string(errbuf_.data()) : curl_easy_strerror(rc);
  }

  // Runs `t` (a HEAD, or a ranged GET with `headers`). `connects` is how
  // many new connections it took.
  CURLcode perform(Transfer& t, const std::string& url, curl_slist* headers, long& connects) {
    errbuf_[0] = '\0';
    t.easy = easy_;
    t.started = Clock::now();
    t.last_progress = t.started;
    set(easy_, CURLOPT_URL, url.c_str());
    set(easy_, CURLOPT_HEADERDATA, static_cast<void*>(&t));
    set(easy_, CURLOPT_WRITEDATA, static_cast<void*>(&t));
    set(easy_, CURLOPT_XFERINFODATA, static_cast<void*>(&t));
    if (t.ranged) {
      set(easy_, CURLOPT_HTTPGET, 1L);
      const auto range = fmt::format("{}-{}", t.offset, last_byte(t.offset, t.length));
      set(easy_, CURLOPT_RANGE, range.c_str());  // copied by curl
    } else {
      set(easy_, CURLOPT_NOBODY, 1L);
      set(easy_, CURLOPT_RANGE, static_cast<const char*>(nullptr));
    }
    set(easy_, CURLOPT_HTTPHEADER, headers);
    CURLcode rc = curl_easy_perform(easy_);
    set(easy_, CURLOPT_HTTPHEADER, static_cast<curl_slist*>(nullptr));
    connects = 0;
    curl_easy_getinfo(easy_, CURLINFO_NUM_CONNECTS, &connects);
    return rc;
  }

 private:
  CURL* easy_;
  std::array<char, CURL_ERROR_SIZE> errbuf_{};
};

using HeaderList = std::unique_ptr<curl_slist, decltype(&curl_slist_free_all)>;

class HttpSource final : public Source {
 public:
  explicit HttpSource(Settings settings) : s_(std::move(settings)) {}

  ~HttpSource() override {
    for (auto& t : warmers_) t.join();
  }

  std::string describe() const override { return s_.uri; }
  unsigned max_concurrency() const override { return s_.connections; }
  SourceState state() const override { return state_.load(std::memory_order_relaxed); }

  // Ends transfers at once: their sockets are shut down.
  void cancel() override {
    cancelled_.store(true, std::memory_order_release);
    cancellation_.cancel();
    std::lock_guard lock(mu_);
    cv_.notify_all();  // checkout() waiters
  }

  Status stat(const std::string& path, SourceStat& out) override {
    counters_.stats.fetch_add(1, std::memory_order_relaxed);
    Transfer t;
    t.path = path;
    auto st = perform(t, url_for(path), nullptr);
    if (!st.ok()) return st;
    if (t.resp.code != 200) {
      return t.protocol_error(fmt::format("HEAD answered with {}", t.resp.code));
    }
    if (!t.resp.content_length) {
      return Status::permanent(
          EIO, fmt::format("{} on {}: no Content-Length, so no size to check", path, s_.uri));
    }
    out = SourceStat{};
    out.mode = S_IFREG | 0444;
    out.size = *t.resp.content_length;
    if (!t.resp.last_modified.empty()) {
      const time_t mtime = curl_getdate(t.resp.last_modified.c_str(), nullptr);
      if (mtime > 0) out.mtime = mtime;
    }
    out.atime = out.mtime;
    remember(path, Validator{t.resp.etag, t.resp.last_modified, out.size});
    return {};
  }

  // HEADs on up to max_concurrency() connections at once; the answers are
  // handed to `done` on the calling thread as they come.
  void stat_many(const std::vector<std::string>& paths, const StatDone& done) override {
    const size_t workers = std::min<size_t>(s_.connections, paths.size());
    if (workers <= 1) {
      Source::stat_many(paths, done);
      return;
    }
    struct Answer {
      size_t index;
      Status status;
      SourceStat st;
    };
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Answer> answers;
    std::atomic<size_t> next{0};
    std::atomic<bool> stop{false};
    auto work = [&] {
      for (size_t i; !stop.load() && (i = next.fetch_add(1)) < paths.size();) {
        Answer a{i, {}, {}};
        try {
          a.status = stat(paths[i], a.st);
        } catch (const std::exception& e) {
          a.status = Status::transient(EIO, fmt::format("stat {}: {}", paths[i], e.what()));
        }
        std::lock_guard lock(mu);
        answers.push_back(std::move(a));
        cv.notify_one();
      }
    };
    std::vector<std::thread> threads;
    struct Joiner {
      std::atomic<bool>& stop;
      std::vector<std::thread>& threads;
      ~Joiner() {
        stop = true;
        for (auto& t : threads) t.join();
      }
    } joiner{stop, threads};
    for (size_t w = 0; w < workers; ++w) threads.emplace_back(work);
    for (size_t answered = 0; answered < paths.size(); ++answered) {
      Answer a;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return !answers.empty(); });
        a = std::move(answers.front());
        answers.pop_front();
      }
      done(a.index, a.status, a.st);
    }
  }

  Status read(const std::string& path, uint64_t offset, uint64_t length,
              const ChunkSink& sink) override {
    counters_.reads.fetch_add(1, std::memory_order_relaxed);
    if (length == 0) return {};
    const auto expect = validator(path);
    Transfer t;
    t.path = path;
    t.ranged = true;
    t.offset = offset;
    t.length = length;
    t.expect = expect ? &*expect : nullptr;
    t.sink = &sink;
    HeaderList headers(nullptr, &curl_slist_free_all);
    if (expect) {
      // If-Match makes a changed file a 412 without a body; If-Range covers
      // servers that ignore If-Match (a 200, refused at its headers).
      const std::string& v = strong_etag(expect->etag) ? expect->etag : expect->last_modified;
      if (!v.empty()) {
        const char* cond = strong_etag(expect->etag) ? "If-Match: " : "If-Unmodified-Since: ";
        for (const auto& h : {cond + v, "If-Range: " + v}) {
          curl_slist* more = curl_slist_append(headers.get(), h.c_str());
          if (!more) return Status::transient(ENOMEM, "cannot build HTTP headers");
          (void)headers.release();
          headers.reset(more);
        }
      }
    }
    auto st = perform(t, url_for(path), headers.get());
    counters_.bytes_read.fetch_add(t.delivered, std::memory_order_relaxed);
    log::debug(kLog, "read path={} off={} len={} got={} code={} errno={}", path, offset, length,
               t.delivered, t.resp.code, st.errnum());
    if (!st.ok()) return st;
    switch (t.resp.code) {
      case 200:
      case 206:
        if (t.delivered != t.body_bytes) {
          return Status::transient(
              ECONNRESET, fmt::format("GET {} on {}: the answer ended after {} of {} bytes", path,
                                      s_.uri, t.delivered, t.body_bytes));
        }
        if (!expect && t.resp.code == 206) {
          ContentRange cr;
          parse_content_range(t.resp.content_range, cr);
          remember(path, Validator{t.resp.etag, t.resp.last_modified, cr.total});
        }
        return {};
      case 412:
        if (!expect) break;
        return t.changed(fmt::format("precondition failed: {} is no longer current",
                                     strong_etag(expect->etag)
                                         ? "ETag " + expect->etag
                                         : "Last-Modified " + expect->last_modified));
      case 416: {
        // Nothing at or past the end: the file ends before `offset`.
        ContentRange cr;
        parse_content_range(t.resp.content_range, cr);
        std::optional<uint64_t> size = cr.total;
        if (!size && expect) size = expect->size;
        if (expect && expect->size && cr.total && *cr.total != *expect->size) {
          return t.changed(
              fmt::format("size {} at the first stat, now {}", *expect->size, *cr.total));
        }
        if (size && offset >= *size) return {};
        return t.protocol_error(
            fmt::format("416 for bytes from {} of a file of {}", offset,
                        size ? std::to_string(*size) : std::string("unknown size")));
      }
      default:
        break;
    }
    return t.protocol_error(fmt::format("GET answered with {}", t.resp.code));
  }

  // Opens the pool's other connections in parallel, so the first reads
  // after a mount do not each wait for a TCP (and TLS) handshake.
  void warm_up_async() override {
    unsigned want;
    {
      std::lock_guard lock(mu_);
      want = s_.connections - std::min(s_.connections, open_);
    }
    for (unsigned i = 0; i < want; ++i) {
      warmers_.emplace_back([this] {
        {
          std::lock_guard lock(mu_);
          if (open_ >= s_.connections) return;
          ++open_;
        }
        auto c = std::make_unique<Connection>(s_, cancellation_);
        if (!c->valid()) {
          c.reset();
          release_slot();
          return;
        }
        Transfer t;
        t.path = "/";
        try {
          (void)perform_on(*c, t, s_.origin + s_.prefix + "/", nullptr);
        } catch (const std::exception& e) {
          log::warn(kLog, "warm-up failed reason=\"{}\"", e.what());
        }
        checkin(std::move(c));
      });
    }
  }

  // One HEAD of BASE/: any HTTP answer shows the server is there.
  Status warm_up() {
    Transfer t;
    t.path = "/";
    auto st = perform(t, s_.origin + s_.prefix + "/", nullptr);
    if (t.final) {
      log::info(kLog, "reachable uri={} code={}", s_.uri, t.resp.code);
      started_.store(true, std::memory_order_relaxed);
      return {};
    }
    return st;
  }

 private:
  std::string url_for(const std::string& path) const {
    if (path.empty() || path.front() != '/') return s_.origin + s_.prefix + "/" + encode_path(path);
    return s_.origin + s_.prefix + encode_path(path);
  }

  std::optional<Validator> validator(const std::string& path) {
    std::lock_guard lock(validators_mu_);
    auto it = validators_.find(path);
    if (it == validators_.end()) return std::nullopt;
    return it->second;
  }

  // Keeps the first validators seen for `path`; a later difference is only
  // logged here (reads refuse the changed file).
  void remember(const std::string& path, Validator v) {
    std::lock_guard lock(validators_mu_);
    auto [it, added] = validators_.try_emplace(path, std::move(v));
    if (!added && (it->second.etag != v.etag || it->second.last_modified != v.last_modified)) {
      log::warn(kLog, "changed since the first stat path={} etag_was={} etag_now={}", path,
                it->second.etag, v.etag);
    }
  }

  Status perform(Transfer& t, const std::string& url, curl_slist* headers) {
    auto c = checkout();
    if (cancelled_.load(std::memory_order_acquire)) {
      if (c) checkin(std::move(c));
      return shutting_down();
    }
    if (!c) return Status::transient(ENOMEM, "cannot create a curl handle");
    Status st;
    try {
      st = perform_on(*c, t, url, headers);
    } catch (...) {
      checkin(std::move(c));
      throw;
    }
    checkin(std::move(c));
    return st;
  }

  // Runs `t` on `c` and maps what happened to a Status. HTTP error codes
  // other than 412 and 416 are mapped here; the rest is the caller's.
  Status perform_on(Connection& c, Transfer& t, const std::string& url, curl_slist* headers) {
    t.s = &s_;
    t.cancelled = &cancelled_;
    long connects = 0;
    const CURLcode rc = c.perform(t, url, headers, connects);
    if (connects > 0) {
      const auto n =
          counters_.connects.fetch_add(static_cast<uint64_t>(connects), std::memory_order_relaxed) +
          static_cast<uint64_t>(connects);
      // Logged once the connection carried an answer: one that failed to
      // come up is logged as such below.
      if (t.resp.code != 0) {
        log::info(kLog, "connected uri={} connects={}", s_.uri, n);
        if (s_.insecure && s_.https) {
          log::warn(kLog, "certificate NOT checked (insecure) origin={}", s_.origin);
        }
      }
    }
    if (t.callback_error) std::rethrow_exception(t.callback_error);
    if (!t.refusal.ok()) {
      state_.store(SourceState::kConnected, std::memory_order_relaxed);
      return t.refusal;
    }
    // A cancel shut the socket down: whatever curl made of that.
    if (rc != CURLE_OK && cancelled_.load(std::memory_order_acquire)) return shutting_down();
    const std::string what = fmt::format("{} {} on {}", t.ranged ? "GET" : "HEAD", t.path, s_.uri);
    if (t.stalled) {
      state_.store(SourceState::kRetrying, std::memory_order_relaxed);
      return Status::transient(
          ETIMEDOUT, fmt::format("{}: no progress for {} ms", what, s_.stall_timeout.count()));
    }
    if (t.final) {
      state_.store(SourceState::kConnected, std::memory_order_relaxed);
      const long code = t.resp.code;
      if (code >= 400 && code != 412 && code != 416) return http_error(t.path, code);
      // An answer whose body we did not want may have been cut short.
      if (rc == CURLE_OK || (!t.accepted && rc == CURLE_WRITE_ERROR)) return {};
    }
    return curl_error(c, rc, what);
  }

  Status http_error(const std::string& path, long code) const {
    auto where = fmt::format("{} on {}", path, s_.uri);
    switch (code) {
      case 404:
      case 410:
        return Status::permanent(ENOENT, fmt::format("{}: no such file (HTTP {})", where, code));
      case 401:
      case 403:
      case 407:
        return Status::permanent(EACCES,
                                 fmt::format("{}: permission denied (HTTP {})", where, code));
      case 408:
      case 429:
        return Status::transient(EAGAIN, fmt::format("{}: server busy (HTTP {})", where, code));
      default:
        if (code >= 500) {
          return Status::transient(EIO, fmt::format("{}: server error (HTTP {})", where, code));
        }
        return Status::permanent(EIO, fmt::format("{}: unexpected HTTP {}", where, code));
    }
  }

  Status curl_error(const Connection& c, CURLcode rc, const std::string& what) {
    const auto text = c.error_text(rc);
    Status st;
    bool connect_failure = true;
    switch (rc) {
      case CURLE_OK:
        st = Status::transient(EPROTO, fmt::format("{}: no answer", what));
        connect_failure = false;
        break;
      case CURLE_COULDNT_RESOLVE_HOST:
        st = Status::transient(EHOSTUNREACH,
                               fmt::format("cannot connect to {}: {}", s_.origin, text));
        break;
      case CURLE_COULDNT_CONNECT: {
        long os_errno = 0;
        curl_easy_getinfo(c.easy(), CURLINFO_OS_ERRNO, &os_errno);
        const int err = os_errno > 0 ? static_cast<int>(os_errno) : ECONNREFUSED;
        st = Status::transient(err, fmt::format("cannot connect to {}: {}", s_.origin,
                                                os_errno > 0 ? errno_text(err) : text));
        break;
      }
      case CURLE_OPERATION_TIMEDOUT:
        // Only the connect phase has a curl time-out; stalls are ours.
        st = Status::transient(ETIMEDOUT, fmt::format("cannot connect to {}: no answer in {} ms",
                                                      s_.origin, s_.connect_timeout.count()));
        break;
      case CURLE_SSL_CONNECT_ERROR:
        st = Status::transient(EPROTO,
                               fmt::format("TLS handshake with {} failed: {}", s_.origin, text));
        break;
      case CURLE_PEER_FAILED_VERIFICATION:
        st = Status::permanent(
            EACCES, fmt::format("the certificate of {} is not trusted: {}", s_.origin, text));
        break;
      case CURLE_SSL_CACERT_BADFILE:
        st = Status::permanent(EINVAL,
                               fmt::format("cannot use the CA file {}: {}", s_.ca_file, text));
        break;
      case CURLE_TOO_MANY_REDIRECTS:
        st = Status::permanent(ELOOP,
                               fmt::format("{}: more than {} redirects", what, kMaxRedirects));
        connect_failure = false;
        break;
      case CURLE_UNSUPPORTED_PROTOCOL:
        st = Status::permanent(EPROTONOSUPPORT, fmt::format("{}: {}", what, text));
        connect_failure = false;
        break;
      default:
        st = Status::transient(ECONNRESET, fmt::format("{}: {}", what, text));
        connect_failure = false;
        break;
    }
    if (connect_failure) {
      counters_.connect_failures.fetch_add(1, std::memory_order_relaxed);
      state_.store(SourceState::kDown, std::memory_order_relaxed);
      // At start the caller reports it (make_http_source's status).
      if (started_.load(std::memory_order_relaxed)) {
        log::warn(kLog, "connect failed reason=\"{}\"", st.message());
      }
    } else {
      state_.store(SourceState::kRetrying, std::memory_order_relaxed);
    }
    return st;
  }

  std::unique_ptr<Connection> checkout() {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] {
        return cancelled_.load(std::memory_order_acquire) || !idle_.empty() ||
               open_ < s_.connections;
      });
      if (cancelled_.load(std::memory_order_acquire)) return nullptr;
      if (!idle_.empty()) {
        // The most recently used first: its connection is the likeliest alive.
        auto c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
      ++open_;
    }
    auto c = std::make_unique<Connection>(s_, cancellation_);
    if (!c->valid()) {
      c.reset();
      release_slot();
    }
    return c;
  }

  void checkin(std::unique_ptr<Connection> c) {
    std::lock_guard lock(mu_);
    idle_.push_back(std::move(c));
    cv_.notify_one();
  }

  void release_slot() {
    std::lock_guard lock(mu_);
    --open_;
    cv_.notify_one();
  }

  const Settings s_;
  detail::Cancellation cancellation_;  // before the connections: outlives them
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Connection>> idle_;  // guarded by mu_
  unsigned open_ = 0;                              // handles idle or in use; guarded by mu_
  std::mutex validators_mu_;
  std::unordered_map<std::string, Validator> validators_;  // guarded by validators_mu_
  std::atomic<SourceState> state_{SourceState::kConnected};
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> started_{false};  // warm_up succeeded
  std::vector<std::thread> warmers_;  // joined on destruction
};

// The base URL without its user name and password, for messages.
std::string redact(const std::string& url) {
  auto scheme = url.find("://");
  if (scheme == std::string::npos) return url;
  auto start = scheme + 3;
  auto end = url.find_first_of("/?#", start);
  auto at = url.rfind('@', end == std::string::npos ? url.size() : end);
  if (at == std::string::npos || at < start) return url;
  return url.substr(0, start) + url.substr(at + 1);
}

struct UrlParts {
  std::unique_ptr<CURLU, decltype(&curl_url_cleanup)> u{curl_url(), &curl_url_cleanup};
  // The part, or nullopt when the URL has none.
  std::optional<std::string> get(CURLUPart what, unsigned flags = 0) const {
    char* value = nullptr;
    if (curl_url_get(u.get(), what, &value, flags) != CURLUE_OK || !value) return std::nullopt;
    std::string out(value);
    curl_free(value);
    return out;
  }
};

Status parse_base_url(const std::string& url, Settings& s) {
  const auto shown = redact(url);
  UrlParts parts;
  if (!parts.u) return Status::transient(ENOMEM, "cannot parse a URL");
  if (auto rc = curl_url_set(parts.u.get(), CURLUPART_URL, url.c_str(), 0); rc != CURLUE_OK) {
    return Status::permanent(
        EINVAL, fmt::format("source {}: not a valid URL ({})", shown, curl_url_strerror(rc)));
  }
  const auto scheme = parts.get(CURLUPART_SCHEME).value_or("");
  if (scheme != "http" && scheme != "https") {
    return Status::permanent(EINVAL, fmt::format("source {}: unsupported scheme \"{}\" (expected "
                                                 "http://HOST[:PORT][/PREFIX] or https://...)",
                                                 shown, scheme));
  }
  if (parts.get(CURLUPART_QUERY) || parts.get(CURLUPART_FRAGMENT)) {
    return Status::permanent(
        EINVAL, fmt::format("source {}: a query or fragment has no place in the base URL", shown));
  }
  const auto host = parts.get(CURLUPART_HOST).value_or("");
  if (host.empty()) return Status::permanent(EINVAL, fmt::format("source {}: empty host", shown));
  const auto port = parts.get(CURLUPART_PORT);
  s.https = scheme == "https";
  s.origin = scheme + "://" + host + (port ? ":" + *port : "");
  s.prefix = parts.get(CURLUPART_PATH).value_or("/");
  while (!s.prefix.empty() && s.prefix.back() == '/') s.prefix.pop_back();
  s.uri = s.origin + (s.prefix.empty() ? "/" : s.prefix);
  if (auto user = parts.get(CURLUPART_USER, CURLU_URLDECODE)) {
    s.credentials = true;
    s.user = *user;
    s.password = parts.get(CURLUPART_PASSWORD, CURLU_URLDECODE).value_or("");
  }
  return {};
}

}  // namespace

std::unique_ptr<Source> make_http_source(const HttpOptions& options, Status& status) {
  init_curl_once();
  Settings s;
  status = parse_base_url(options.base_url, s);
  if (!status.ok()) return nullptr;
  if (options.connections == 0) {
    status = Status::permanent(EINVAL, "an HTTP source needs at least one connection");
    return nullptr;
  }
  if (options.stall_timeout.count() <= 0 || options.connect_timeout.count() <= 0) {
    status = Status::permanent(EINVAL, "HTTP time-outs must be positive");
    return nullptr;
  }
  s.connections = options.connections;
  s.ca_file = options.ca_file;
  s.insecure = options.insecure;
  s.connect_timeout = options.connect_timeout;
  s.stall_timeout = options.stall_timeout;
  s.user_agent = options.user_agent.empty() ? "lazyfs/" LAZYFS_VERSION : options.user_agent;
  if (s.insecure && s.https) {
    log::warn(kLog, "certificates will NOT be checked (insecure) origin={}", s.origin);
  }
  auto source = std::make_unique<HttpSource>(std::move(s));
  status = source->warm_up();
  if (!status.ok()) return nullptr;
  return source;
}

}  // namespace lazyfs
