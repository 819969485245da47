#include "server/openai_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace hla {

using json = nlohmann::json;

namespace {

// A request the server refuses: HTTP status + OpenAI-style error body.
struct ApiError {
  int status;
  std::string message;
  std::string param;
  std::string type = "invalid_request_error";
};

json error_body(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}, {"code", nullptr}};
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  return {{"error", err}};
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Typed access to request fields; a wrong type is a 400 naming the field.
struct Body {
  json j;
  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t integer(const char* k, int64_t dflt) const {
    if (!has(k)) return dflt;
    if (!j[k].is_number_integer()) throw ApiError{400, std::string("'") + k + "' must be an integer", k};
    return j[k].get<int64_t>();
  }
  double number(const char* k, double dflt) const {
    if (!has(k)) return dflt;
    if (!j[k].is_number()) throw ApiError{400, std::string("'") + k + "' must be a number", k};
    return j[k].get<double>();
  }
  bool boolean(const char* k, bool dflt) const {
    if (!has(k)) return dflt;
    if (!j[k].is_boolean()) throw ApiError{400, std::string("'") + k + "' must be true or false", k};
    return j[k].get<bool>();
  }
};

Body parse_body(const httplib::Request& req) {
  Body b;
  try {
    b.j = json::parse(req.body);
  } catch (const json::exception& e) {
    throw ApiError{400, std::string("request body is not valid JSON: ") + e.what(), ""};
  }
  if (!b.j.is_object()) throw ApiError{400, "request body must be a JSON object", ""};
  return b;
}

// Turns a request's token ids into the text to send: decodes across token boundaries (whole UTF-8
// characters only) and applies the request's stop strings, holding back text that might be the
// start of one. Without a tokenizer there is no text.
class TextStream {
 public:
  TextStream(const Tokenizer* tok, std::vector<std::string> stops) : stops_(std::move(stops)) {
    if (tok) decoder_ = std::make_unique<Detokenizer>(*tok);
  }
  // Text that can be sent after these ids; sets stopped() when a stop string appeared.
  std::string push(const std::vector<int64_t>& ids) {
    if (!decoder_ || stopped_) return "";
    for (int64_t id : ids) held_ += decoder_->push(id);
    return release(false);
  }
  std::string finish() {
    if (!decoder_ || stopped_) return "";
    held_ += decoder_->finish();
    return release(true);
  }
  bool stopped() const { return stopped_; }

 private:
  std::string release(bool all) {
    size_t cut = std::string::npos;
    for (auto& st : stops_) cut = std::min(cut, held_.find(st));
    if (cut != std::string::npos) {
      stopped_ = true;
      std::string out = held_.substr(0, cut);
      held_.clear();
      return out;
    }
    size_t keep = 0;  // the longest tail of held_ that begins some stop string
    if (!all)
      for (auto& st : stops_)
        for (size_t n = std::min(st.size() - 1, held_.size()); n > keep; --n)
          if (held_.compare(held_.size() - n, n, st, 0, n) == 0) {
            keep = n;
            break;
          }
    std::string out = held_.substr(0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
    return out;
  }
  std::unique_ptr<Detokenizer> decoder_;
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace

struct OpenAIServer::Impl {
  const TextModel& tm;
  const Model& model;
  ServerOptions opt;
  Engine engine;
  httplib::Server http;
  std::atomic<uint64_t> next_id{1};
  std::mutex metrics_mu;
  std::map<std::pair<std::string, int>, int64_t> responses;  // (endpoint, status) -> count
  std::atomic<int64_t> cancelled{0};

  Impl(const TextModel& t, ServerOptions o) : tm(t), model(*t.model), opt(std::move(o)), engine(model, opt.engine, opt.device) {}

  void count(const std::string& endpoint, int status) {
    std::lock_guard<std::mutex> lock(metrics_mu);
    responses[{endpoint, status}]++;
  }

  void check_model(const Body& b) const {
    if (!b.has("model")) return;  // one model is served; naming it is optional
    if (!b.j["model"].is_string()) throw ApiError{400, "'model' must be a string", "model"};
    const std::string m = b.j["model"].get<std::string>();
    if (m != opt.model_name)
      throw ApiError{404, "model '" + m + "' does not exist (this server has '" + opt.model_name + "')", "model",
                     "not_found_error"};
  }

  GenerationParams generation_params(const Body& b, int64_t default_max_tokens) const {
    GenerationParams p;
    p.max_tokens = b.integer("max_tokens", b.integer("max_completion_tokens", default_max_tokens));
    if (p.max_tokens < 0) throw ApiError{400, "'max_tokens' must be >= 0", "max_tokens"};
    if (p.max_tokens > opt.max_tokens_limit)
      throw ApiError{400, "'max_tokens' exceeds this server's limit of " + std::to_string(opt.max_tokens_limit),
                     "max_tokens"};
    p.sampling.temperature = float(b.number("temperature", 1.0));
    if (p.sampling.temperature < 0 || p.sampling.temperature > 2)
      throw ApiError{400, "'temperature' must be in [0, 2]", "temperature"};
    p.sampling.top_p = float(b.number("top_p", 1.0));
    if (!(p.sampling.top_p > 0 && p.sampling.top_p <= 1)) throw ApiError{400, "'top_p' must be in (0, 1]", "top_p"};
    p.sampling.top_k = b.integer("top_k", 0);
    if (p.sampling.top_k < 0) throw ApiError{400, "'top_k' must be >= 0", "top_k"};
    p.sampling.seed = uint64_t(b.integer("seed", int64_t(next_id.load())));
    if (b.integer("n", 1) != 1) throw ApiError{400, "only n = 1 is supported", "n"};
    p.stop_ids = tm.stop_ids;
    return p;
  }

  // "stop": a string or up to 4 strings; they need a tokenizer to be seen.
  std::vector<std::string> stop_strings(const Body& b) const {
    std::vector<std::string> stops;
    if (!b.has("stop")) return stops;
    const json& st = b.j["stop"];
    if (st.is_string())
      stops.push_back(st.get<std::string>());
    else if (st.is_array() && st.size() <= 4 &&
             std::all_of(st.begin(), st.end(), [](auto& x) { return x.is_string(); }))
      for (auto& x : st) stops.push_back(x.get<std::string>());
    else
      throw ApiError{400, "'stop' must be a string or an array of up to 4 strings", "stop"};
    for (auto& x : stops)
      if (x.empty()) throw ApiError{400, "'stop' strings must not be empty", "stop"};
    if (!stops.empty() && !tm.tokenizer)
      throw ApiError{400, "'stop' strings need a tokenizer; this model has none", "stop"};
    return stops;
  }

  void check_prompt_length(const std::vector<int64_t>& ids, const char* param) const {
    if (int64_t(ids.size()) > opt.max_prompt_tokens)
      throw ApiError{400,
                     "prompt has " + std::to_string(ids.size()) + " tokens, over this server's limit of " +
                         std::to_string(opt.max_prompt_tokens),
                     param};
  }

  std::vector<int64_t> prompt_ids(const json& prompt) const {
    std::vector<int64_t> ids;
    if (prompt.is_array() && !prompt.empty() && prompt[0].is_number_integer()) {
      for (auto& v : prompt) {
        if (!v.is_number_integer()) throw ApiError{400, "'prompt' token arrays must hold integers only", "prompt"};
        const int64_t id = v.get<int64_t>();
        if (id < 0 || id >= model.spec().vocab)
          throw ApiError{400,
                         "'prompt' token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                             std::to_string(model.spec().vocab) + ")",
                         "prompt"};
        ids.push_back(id);
      }
    } else if (prompt.is_string()) {
      if (!tm.tokenizer)
        throw ApiError{400, "this model directory has no tokenizer.json: send 'prompt' as an array of token ids",
                       "prompt"};
      ids = tm.encode_prompt(prompt.get<std::string>());
    } else {
      throw ApiError{400, "'prompt' must be a string or an array of token ids", "prompt"};
    }
    if (ids.empty()) throw ApiError{400, "'prompt' is empty", "prompt"};
    check_prompt_length(ids, "prompt");
    return ids;
  }

  std::shared_ptr<Request> submit(std::vector<int64_t> ids, GenerationParams p) {
    auto r = engine.submit(std::move(ids), std::move(p));
    if (!r)
      throw ApiError{429, "the server is at its limit of concurrent requests; retry later", "", "rate_limit_error"};
    return r;
  }

  static std::string finish_reason(const Request& r, const TextStream& text) {
    const std::string f = r.finish_reason();
    return text.stopped() ? "stop" : f == "length" ? f : "stop";
  }

  json usage(const Request& r, int64_t generated) const {
    const int64_t p = int64_t(r.prompt.size());
    return {{"prompt_tokens", p},
            {"completion_tokens", generated},
            {"total_tokens", p + generated},
            {"prompt_tokens_details", {{"cached_tokens", r.cached_prompt_tokens()}}}};
  }

  // Non-streaming: wait for the whole completion (or its first stop string); returns the ids and
  // puts the text in *text_out.
  std::vector<int64_t> collect(Request& r, TextStream& text, std::string* text_out) {
    std::vector<int64_t> out;
    bool done = false;
    while (!done && !text.stopped()) {
      const size_t before = out.size();
      done = r.wait(&out, std::chrono::milliseconds(200));
      *text_out += text.push(std::vector<int64_t>(out.begin() + long(before), out.end()));
    }
    if (text.stopped())
      r.cancel();
    else
      *text_out += text.finish();
    if (r.finish_reason().rfind("error", 0) == 0) throw ApiError{500, r.finish_reason(), "", "server_error"};
    return out;
  }

  // Streams tokens as server-sent events; `chunk` builds the JSON of one event from new tokens
  // (final=true once, with the finish reason). A write that fails means the client left: cancel.
  void stream(httplib::Response& res, std::shared_ptr<Request> r, std::shared_ptr<TextStream> text,
              std::function<json(const std::vector<int64_t>&, const std::string&, bool final)> chunk) {
    auto sent_done = std::make_shared<bool>(false);
    res.set_chunked_content_provider(
        "text/event-stream",
        [r, text, chunk, sent_done](size_t, httplib::DataSink& sink) {
          try {
            std::vector<int64_t> toks;
            bool done = r->wait(&toks, std::chrono::milliseconds(500));
            std::string piece = text->push(toks);
            if (text->stopped())
              r->cancel(), done = true;  // a stop string ends the request here
            else if (done)
              piece += text->finish();
            std::string out;
            if (!toks.empty() || !piece.empty()) out += "data: " + chunk(toks, piece, false).dump() + "\n\n";
            if (done) out += "data: " + chunk({}, "", true).dump() + "\n\ndata: [DONE]\n\n";
            if (out.empty()) out = ": keep-alive\n\n";              // also detects a client that went away
            if (!sink.write(out.data(), out.size())) return false;  // the client left
            if (done) {
              *sent_done = true;
              sink.done();
            }
            return true;
          } catch (const std::exception& e) {  // never let one stream take the server down
            r->cancel();
            const std::string err = "data: " + error_body({500, e.what(), "", "server_error"}).dump() + "\n\n";
            sink.write(err.data(), err.size());
            return false;
          }
        },
        [this, r, sent_done](bool) {
          if (*sent_done) return;
          r->cancel();
          cancelled++;
        });
  }

  std::string new_id(const char* prefix) { return prefix + std::to_string(next_id++); }

  void completions(const httplib::Request& req, httplib::Response& res) {
    Body b = parse_body(req);
    check_model(b);
    if (!b.has("prompt")) throw ApiError{400, "'prompt' is required", "prompt"};
    std::vector<int64_t> ids = prompt_ids(b.j["prompt"]);
    GenerationParams p = generation_params(b, 16);
    auto text = std::make_shared<TextStream>(tm.tokenizer.get(), stop_strings(b));
    const bool streaming = b.boolean("stream", false);
    auto r = submit(std::move(ids), std::move(p));
    const json base = {
        {"id", new_id("cmpl-")}, {"object", "text_completion"}, {"created", unix_now()}, {"model", opt.model_name}};
    if (!streaming) {
      std::string out_text;
      std::vector<int64_t> out = collect(*r, *text, &out_text);
      json body = base;
      body["choices"] = json::array({{{"index", 0},
                                      {"text", out_text},
                                      {"token_ids", out},
                                      {"logprobs", nullptr},
                                      {"finish_reason", finish_reason(*r, *text)}}});
      body["usage"] = usage(*r, int64_t(out.size()));
      res.set_content(body.dump(), "application/json");
      return;
    }
    auto generated = std::make_shared<int64_t>(0);
    stream(res, r, text,
           [this, r, text, base, generated](const std::vector<int64_t>& toks, const std::string& piece, bool final) {
             json c = base;
             *generated += int64_t(toks.size());
             c["choices"] = json::array({{{"index", 0},
                                          {"text", piece},
                                          {"token_ids", toks},
                                          {"logprobs", nullptr},
                                          {"finish_reason", final ? json(finish_reason(*r, *text)) : json(nullptr)}}});
             if (final) c["usage"] = usage(*r, *generated);
             return c;
           });
  }

  // messages -> [{role, content}] for the template; content may be a string or text parts.
  nlohmann::ordered_json chat_messages(const Body& b) const {
    if (!b.has("messages") || !b.j["messages"].is_array() || b.j["messages"].empty())
      throw ApiError{400, "'messages' must be a non-empty array", "messages"};
    nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
    for (auto& m : b.j["messages"]) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
        throw ApiError{400, "each message needs a string 'role'", "messages"};
      const std::string role = m["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer")
        throw ApiError{400, "unknown message role '" + role + "'", "messages"};
      std::string content;
      if (m.contains("content") && m["content"].is_string()) {
        content = m["content"].get<std::string>();
      } else if (m.contains("content") && m["content"].is_array()) {
        for (auto& part : m["content"]) {
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
              !part["text"].is_string())
            throw ApiError{400, "only text content parts are supported", "messages"};
          content += part["text"].get<std::string>();
        }
      } else if (!(m.contains("content") && m["content"].is_null() && role == "assistant")) {
        throw ApiError{400, "message 'content' must be a string or an array of text parts", "messages"};
      }
      msgs.push_back({{"role", role == "developer" ? "system" : role}, {"content", content}});
    }
    return msgs;
  }

  void chat_completions(const httplib::Request& req, httplib::Response& res) {
    Body b = parse_body(req);
    check_model(b);
    nlohmann::ordered_json msgs = chat_messages(b);
    if (!tm.tokenizer || !tm.tokenizer->has_chat_template())
      throw ApiError{400, "this model directory has no tokenizer with a chat template: use /v1/completions",
                     "messages"};
    std::vector<int64_t> ids;
    try {
      ids = tm.encode_chat(msgs);
    } catch (const Error& e) {  // the template refused these messages (raise_exception)
      throw ApiError{400, e.what(), "messages"};
    }
    check_prompt_length(ids, "messages");
    GenerationParams p = generation_params(b, std::min<int64_t>(opt.max_tokens_limit, 1024));
    auto text = std::make_shared<TextStream>(tm.tokenizer.get(), stop_strings(b));
    const bool streaming = b.boolean("stream", false);
    auto r = submit(std::move(ids), std::move(p));
    const std::string id = new_id("chatcmpl-");
    const int64_t created = unix_now();
    if (!streaming) {
      std::string out_text;
      std::vector<int64_t> out = collect(*r, *text, &out_text);
      json body = {{"id", id}, {"object", "chat.completion"}, {"created", created}, {"model", opt.model_name}};
      body["choices"] = json::array({{{"index", 0},
                                      {"message", {{"role", "assistant"}, {"content", out_text}}},
                                      {"logprobs", nullptr},
                                      {"finish_reason", finish_reason(*r, *text)}}});
      body["usage"] = usage(*r, int64_t(out.size()));
      res.set_content(body.dump(), "application/json");
      return;
    }
    auto first = std::make_shared<bool>(true);
    auto generated = std::make_shared<int64_t>(0);
    stream(
        res, r, text,
        [this, r, text, id, created, first, generated](const std::vector<int64_t>& toks, const std::string& piece,
                                                       bool final) {
          json c = {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", opt.model_name}};
          *generated += int64_t(toks.size());
          json delta = json::object();
          if (*first) delta["role"] = "assistant", *first = false;
          if (!final) delta["content"] = piece;
          c["choices"] = json::array({{{"index", 0},
                                       {"delta", delta},
                                       {"logprobs", nullptr},
                                       {"finish_reason", final ? json(finish_reason(*r, *text)) : json(nullptr)}}});
          if (final) c["usage"] = usage(*r, *generated);
          return c;
        });
  }

  std::string metrics_text() {
    const EngineStats s = engine.stats();
    std::string t;
    auto metric = [&](const char* name, const char* type, const char* help, int64_t v) {
      t += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
           std::to_string(v) + "\n";
    };
    metric("hla_requests_total", "counter", "Generation requests accepted.", int64_t(s.requests));
    metric("hla_prompt_tokens_total", "counter", "Prompt tokens prefilled (cached prefixes excluded).",
           int64_t(s.prompt_tokens));
    metric("hla_generation_tokens_total", "counter", "Tokens generated.", int64_t(s.generated_tokens));
    metric("hla_queue_depth", "gauge", "Requests waiting for a slot.", int64_t(s.queued));
    metric("hla_running_requests", "gauge", "Requests holding a slot.", int64_t(s.running));
    metric("hla_prefix_cache_hits_total", "counter", "Requests that started from a cached prefix.",
           int64_t(s.prefix_hits));
    metric("hla_prefix_cache_misses_total", "counter", "Requests with no cached prefix.", int64_t(s.prefix_misses));
    metric("hla_prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose prefill the prefix cache skipped.",
           int64_t(s.prefix_hit_tokens));
    metric("hla_prefix_cache_bytes", "gauge", "Bytes held by prefix snapshots.", int64_t(s.prefix_cache_bytes));
    metric("hla_engine_steps_total", "counter", "Batched forward steps.", int64_t(s.steps));
    metric("hla_cancelled_requests_total", "counter", "Requests cancelled because the client disconnected.",
           cancelled.load());
    t += "# HELP hla_http_responses_total HTTP responses by endpoint and status.\n# TYPE hla_http_responses_total "
         "counter\n";
    std::lock_guard<std::mutex> lock(metrics_mu);
    for (auto& [k, v] : responses)
      t += "hla_http_responses_total{endpoint=\"" + k.first + "\",status=\"" + std::to_string(k.second) + "\"} " +
           std::to_string(v) + "\n";
    return t;
  }

  // Wraps a handler: ApiError and hla::Error become JSON 4xx/5xx responses; metrics count them.
  httplib::Server::Handler guarded(const std::string& endpoint,
                                   std::function<void(const httplib::Request&, httplib::Response&)> f) {
    return [this, endpoint, f](const httplib::Request& req, httplib::Response& res) {
      try {
        f(req, res);
      } catch (const ApiError& e) {
        res.status = e.status;
        res.set_content(error_body(e).dump(), "application/json");
      } catch (const std::exception& e) {
        res.status = 500;
        res.set_content(error_body({500, e.what(), "", "server_error"}).dump(), "application/json");
      }
      count(endpoint, res.status == -1 ? 200 : res.status);  // httplib fills in 200 after the handler
    };
  }

  void routes() {
    http.set_payload_max_length(opt.max_body_bytes);
    http.new_task_queue = [n = opt.http_threads] { return new httplib::ThreadPool(size_t(n)); };
    http.Post("/v1/completions", guarded("/v1/completions", [this](auto& q, auto& s) { completions(q, s); }));
    http.Post("/v1/chat/completions",
              guarded("/v1/chat/completions", [this](auto& q, auto& s) { chat_completions(q, s); }));
    http.Get("/v1/models", guarded("/v1/models", [this](auto&, auto& s) {
               json m = {{"id", opt.model_name}, {"object", "model"}, {"created", unix_now()}, {"owned_by", "hla"}};
               s.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(), "application/json");
             }));
    http.Get("/health",
             guarded("/health", [](auto&, auto& s) { s.set_content(R"({"status":"ok"})", "application/json"); }));
    http.Get("/metrics", guarded("/metrics", [this](auto&, auto& s) {
               s.set_content(metrics_text(), "text/plain; version=0.0.4");
             }));
    // Anything else (unknown path, oversized body, bad method): a JSON error, never an HTML page.
    http.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      const std::string msg = res.status == 413   ? "request body exceeds the server's size limit"
                              : res.status == 404 ? "no such endpoint"
                                                  : "bad request";
      res.set_content(error_body({res.status, msg, ""}).dump(), "application/json");
    });
  }
};

OpenAIServer::OpenAIServer(const TextModel& tm, ServerOptions opt) : impl_(std::make_unique<Impl>(tm, std::move(opt))) {
  impl_->routes();
}

OpenAIServer::~OpenAIServer() = default;

void OpenAIServer::run() {
  // Debian's libcpp-httplib is compiled with a listen backlog of 5: a burst of more than 5 new
  // connections overflows the accept queue, and the extra clients wait a 1 s SYN retransmit or get
  // reset. The last socket httplib hands to the options hook is the one it bound, and listen() on a
  // listening socket only resizes its queue.
  socket_t bound = INVALID_SOCKET;
  impl_->http.set_socket_options([&bound](socket_t sock) {
    httplib::default_socket_options(sock);
    bound = sock;
  });
  check(impl_->http.bind_to_port(impl_->opt.host, impl_->opt.port),
        "cannot listen on " + impl_->opt.host + ":" + std::to_string(impl_->opt.port));
  check(::listen(bound, SOMAXCONN) == 0,
        "cannot widen the listen queue on " + impl_->opt.host + ":" + std::to_string(impl_->opt.port));
  impl_->http.listen_after_bind();
}

void OpenAIServer::stop() { impl_->http.stop(); }

}  // namespace hla
