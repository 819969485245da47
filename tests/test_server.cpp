// The OpenAI-compatible server, run as a real `hla serve` process and driven over loopback HTTP
// (cpp-httplib's client): completions equal `hla generate`, streaming, concurrency, the prefix
// cache, bad requests answered with 4xx JSON, and disconnects that cancel cleanly.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "tests/common.h"

using namespace hla;
using json = nlohmann::json;

namespace {

int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// `hla serve` in a child process; waits for /health, kills it on destruction.
struct ServerProcess {
  pid_t pid = -1;
  int port = 0;
  explicit ServerProcess(const std::string& model, std::vector<std::string> extra = {}) {
    port = free_port();
    std::vector<std::string> args = {cli_path(), "serve", "--model", model, "--port", std::to_string(port),
                                     "--model-name", "test-model"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid = fork();
    if (pid == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      freopen("/dev/null", "w", stderr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    httplib::Client c("127.0.0.1", port);
    for (int i = 0; i < 200; ++i) {
      if (auto r = c.Get("/health"); r && r->status == 200) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "server did not come up";
  }
  ~ServerProcess() {
    kill(pid, SIGTERM);
    int st = 0;
    waitpid(pid, &st, 0);
  }
  bool alive() const { return waitpid(pid, nullptr, WNOHANG) == 0; }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    return c;
  }
};

json post(const ServerProcess& s, const std::string& path, const json& body, int* status = nullptr) {
  auto c = s.client();
  auto r = c.Post(path.c_str(), body.dump(), "application/json");
  if (!r) return json{{"transport_error", true}};
  if (status) *status = r->status;
  return json::parse(r->body);
}

// Parses an SSE body into its JSON events (without [DONE]); *done says whether [DONE] came.
std::vector<json> sse_events(const std::string& body, bool* done) {
  std::vector<json> ev;
  *done = false;
  size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    const size_t end = body.find("\n\n", pos);
    const std::string data = body.substr(pos + 6, end - pos - 6);
    if (data == "[DONE]") *done = true;
    else ev.push_back(json::parse(data));
    pos = end;
  }
  return ev;
}

// A raw HTTP client: POSTs a streaming completion and returns the socket once the first response
// bytes have arrived (the request is then running); -1 on failure. The caller closes it.
int open_stream(int port, const json& body) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return -1;
  const std::string b = body.dump();
  const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          "Content-Length: " + std::to_string(b.size()) + "\r\n\r\n" + b;
  char buf[512];
  if (write(fd, req.data(), req.size()) != ssize_t(req.size()) || read(fd, buf, sizeof buf) <= 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string ids_csv(const std::vector<int64_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

}  // namespace

TEST(Server, HealthModelsAndGreedyEqualsGenerate) {
  HLA_REQUIRE_FIXTURES();
  const std::string model = fixture("models/qwen3_next");
  ServerProcess s(model);
  auto c = s.client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto m = json::parse(c.Get("/v1/models")->body);
  EXPECT_EQ(m["data"][0]["id"], "test-model");

  const std::vector<int64_t> prompt = {5, 17, 42, 99, 3};
  int status = 0;
  json r = post(s, "/v1/completions", {{"model", "test-model"}, {"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}},
                &status);
  ASSERT_EQ(status, 200) << r.dump();
  std::string expected;
  ASSERT_EQ(run_command(cli_path() + " generate --model " + model + " --prompt-ids " + ids_csv(prompt) +
                            " --max-new-tokens 12 2>/dev/null",
                        &expected),
            0);
  std::string got;
  for (auto& id : r["choices"][0]["token_ids"]) got += (got.empty() ? "" : " ") + std::to_string(id.get<int64_t>());
  EXPECT_EQ(got + "\n", expected);
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(r["usage"]["completion_tokens"], 12);

  // The same request streamed gives the same tokens, then [DONE].
  auto sr = c.Post("/v1/completions",
                   json{{"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}, {"stream", true}}.dump(),
                   "application/json");
  ASSERT_TRUE(sr);
  EXPECT_EQ(sr->get_header_value("Content-Type"), "text/event-stream");
  bool done = false;
  auto events = sse_events(sr->body, &done);
  EXPECT_TRUE(done);
  std::vector<int64_t> streamed;
  for (auto& e : events)
    for (auto& id : e["choices"][0]["token_ids"]) streamed.push_back(id.get<int64_t>());
  EXPECT_EQ(json(streamed), r["choices"][0]["token_ids"]);
  EXPECT_EQ(events.back()["choices"][0]["finish_reason"], "length");
}

TEST(Server, ConcurrentStreamsAllComplete) {
  HLA_REQUIRE_FIXTURES();
  ServerProcess s(fixture("models/kimi_linear"));
  // Greedy reference for each prompt, one at a time.
  const int n = 16;
  std::vector<json> alone(n);
  for (int i = 0; i < n; ++i)
    alone[size_t(i)] = post(s, "/v1/completions",
                            {{"prompt", {i + 3, 7, i + 11}}, {"max_tokens", 10}, {"temperature", 0}})["choices"][0]["token_ids"];
  std::vector<std::thread> threads;
  std::vector<json> together(n);
  std::vector<char> complete(n, 0);  // not vector<bool>: its bits share words across threads
  std::vector<std::string> errors(n);
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      auto c = s.client();
      auto r = c.Post("/v1/completions",
                      json{{"prompt", {i + 3, 7, i + 11}}, {"max_tokens", 10}, {"temperature", 0}, {"stream", true}}.dump(),
                      "application/json");
      if (!r) {
        errors[size_t(i)] = httplib::to_string(r.error());
        return;
      }
      bool done = false;
      std::vector<int64_t> ids;
      for (auto& e : sse_events(r->body, &done))
        for (auto& id : e["choices"][0]["token_ids"]) ids.push_back(id.get<int64_t>());
      together[size_t(i)] = ids;
      complete[size_t(i)] = done;
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < n; ++i) {
    EXPECT_TRUE(complete[size_t(i)]) << i << " " << errors[size_t(i)];
    // Batched decode runs GEMMs instead of GEMVs: the ids agree unless two logits tie within
    // round-off, which does not happen on this fixture.
    EXPECT_EQ(together[size_t(i)], alone[size_t(i)]) << i;
  }
}

TEST(Server, PrefixCacheSkipsSharedPrefixAndKeepsOutput) {
  HLA_REQUIRE_FIXTURES();
  ServerProcess s(fixture("models/qwen3_next"), {"--prefix-block", "16"});
  std::vector<int64_t> shared;
  for (int i = 0; i < 48; ++i) shared.push_back((i * 37 + 11) % 320);
  auto with_tail = [&](std::vector<int64_t> tail) {
    auto p = shared;
    p.insert(p.end(), tail.begin(), tail.end());
    return p;
  };
  json first = post(s, "/v1/completions", {{"prompt", with_tail({1, 2, 3})}, {"max_tokens", 8}, {"temperature", 0}});
  EXPECT_EQ(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  json second = post(s, "/v1/completions", {{"prompt", with_tail({4, 5})}, {"max_tokens", 8}, {"temperature", 0}});
  EXPECT_EQ(second["usage"]["prompt_tokens_details"]["cached_tokens"], 48);
  // The output with the cache equals a cold run of the same prompt on a fresh server.
  ServerProcess cold(fixture("models/qwen3_next"), {"--prefix-cache-mb", "0"});
  json ref = post(cold, "/v1/completions", {{"prompt", with_tail({4, 5})}, {"max_tokens", 8}, {"temperature", 0}});
  EXPECT_EQ(ref["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  EXPECT_EQ(second["choices"][0]["token_ids"], ref["choices"][0]["token_ids"]);
  auto metrics = s.client().Get("/metrics")->body;
  EXPECT_NE(metrics.find("hla_prefix_cache_hits_total 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("hla_prefix_cache_hit_tokens_total 48"), std::string::npos) << metrics;
}

TEST(Server, BadRequestsGetJson4xxAndServerKeepsServing) {
  HLA_REQUIRE_FIXTURES();
  ServerProcess s(fixture("models/deepseek_v32"), {"--max-prompt-tokens", "64", "--max-body-bytes", "4096"});
  auto c = s.client();
  auto expect_error = [&](const std::string& path, const std::string& body, int status, const std::string& needle) {
    auto r = c.Post(path.c_str(), body, "application/json");
    ASSERT_TRUE(r) << body;
    EXPECT_EQ(r->status, status) << body << " -> " << r->body;
    json j = json::parse(r->body, nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("error")) << r->body;
    EXPECT_NE(j["error"]["message"].get<std::string>().find(needle), std::string::npos) << r->body;
  };
  expect_error("/v1/completions", "{not json", 400, "JSON");
  expect_error("/v1/completions", "[1,2]", 400, "object");
  expect_error("/v1/completions", R"({"prompt": [1,2], "max_tokens": "ten"})", 400, "max_tokens");
  expect_error("/v1/completions", R"({"prompt": [1,2], "max_tokens": -1})", 400, "max_tokens");
  expect_error("/v1/completions", R"({"prompt": [1,2], "temperature": "hot"})", 400, "temperature");
  expect_error("/v1/completions", R"({"prompt": [1,2], "model": "gpt-4"})", 404, "gpt-4");
  expect_error("/v1/completions", R"({"prompt": [1, 99999]})", 400, "99999");
  expect_error("/v1/completions", R"({"prompt": []})", 400, "prompt");
  expect_error("/v1/completions", R"({"max_tokens": 3})", 400, "prompt");
  expect_error("/v1/completions", R"({"prompt": [1,2], "n": 3})", 400, "n");
  json longp = {{"prompt", std::vector<int64_t>(65, 1)}};
  expect_error("/v1/completions", longp.dump(), 400, "limit");
  expect_error("/v1/completions", json{{"prompt", std::vector<int64_t>(5000, 1)}}.dump(), 413, "size");
  expect_error("/v1/chat/completions", R"({"messages": "hi"})", 400, "messages");
  auto nf = c.Get("/v2/nothing");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);
  EXPECT_TRUE(json::parse(nf->body).contains("error"));
  int status = 0;
  post(s, "/v1/completions", {{"prompt", {1, 2, 3}}, {"max_tokens", 2}}, &status);
  EXPECT_EQ(status, 200);
  EXPECT_TRUE(s.alive());
}

TEST(Server, TooManyConcurrentRequestsGet429) {
  HLA_REQUIRE_FIXTURES();
  ServerProcess s(fixture("models/qwen3_next"), {"--max-queued", "1"});
  // A long stream holds the only place: a second request is refused until it is gone.
  const int fd = open_stream(s.port, {{"prompt", {1, 2}}, {"max_tokens", 4000}, {"stream", true}});
  ASSERT_GE(fd, 0);
  int status = 0;
  json r = post(s, "/v1/completions", {{"prompt", {3, 4}}, {"max_tokens", 2}}, &status);
  EXPECT_EQ(status, 429) << r.dump();
  EXPECT_TRUE(r.contains("error"));
  close(fd);
  for (int i = 0; i < 100 && status != 200; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    post(s, "/v1/completions", {{"prompt", {3, 4}}, {"max_tokens", 2}}, &status);
  }
  EXPECT_EQ(status, 200);
}

TEST(Server, ClientDisconnectMidStreamCancels) {
  HLA_REQUIRE_FIXTURES();
  ServerProcess s(fixture("models/qwen3_next"));
  {
    // Read the first bytes of a long stream, then drop the connection.
    const int fd = open_stream(s.port, {{"prompt", {1, 2, 3}}, {"max_tokens", 4000}, {"stream", true}});
    ASSERT_GE(fd, 0);
    close(fd);
  }
  // The engine frees the slot: the running gauge returns to 0 and the server answers.
  std::string metrics;
  for (int i = 0; i < 100; ++i) {
    metrics = s.client().Get("/metrics")->body;
    if (metrics.find("hla_running_requests 0") != std::string::npos &&
        metrics.find("hla_cancelled_requests_total 1") != std::string::npos)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE(metrics.find("hla_running_requests 0"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("hla_cancelled_requests_total 1"), std::string::npos) << metrics;
  int status = 0;
  post(s, "/v1/completions", {{"prompt", {1, 2}}, {"max_tokens", 2}}, &status);
  EXPECT_EQ(status, 200);
}
