// hla tokenize --model DIR [--jsonl] [--decode | --chat]: the model's tokenizer on stdin.
//   default      all of stdin is one text; prints its ids space-separated on one line
//   --jsonl      every line is a JSON string; prints one JSON array of ids per line
//   --decode     the input is ids (space/comma separated, or with --jsonl one JSON array per
//                line) and the output text (with --jsonl one JSON string per line)
//   --chat       every line is a JSON object {messages, add_generation_prompt, ...more template
//                variables}; prints the rendered chat template (with --jsonl as a JSON string)
// Special tokens written in the text are parsed as the tokenizer's added tokens, as transformers
// does; nothing (no BOS) is prepended.
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "apps/commands.h"
#include "core/error.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace hla::cli {

namespace {

struct TokenizeOptions {
  std::string model;
  bool jsonl = false, decode = false, chat = false;
};

std::vector<int32_t> ids_of(const nlohmann::json& j, const std::string& where) {
  check(j.is_array(), where + ": expected a JSON array of token ids");
  std::vector<int32_t> ids;
  for (const auto& x : j) {
    check(x.is_number_integer() && x.get<int64_t>() >= 0 && x.get<int64_t>() <= INT32_MAX,
          where + ": token ids must be non-negative integers");
    ids.push_back(x.get<int32_t>());
  }
  return ids;
}

// A JSON string literal whose lone surrogate escapes ("\ud800") are kept, in generalized UTF-8:
// JavaScript strings can hold them (and its tokenizers encode them), while a JSON library
// rejects them. nullopt when the line is not a JSON string.
std::optional<std::string> json_string_keeping_surrogates(std::string_view line) {
  size_t i = 0;
  auto skip_ws = [&] {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r' || line[i] == '\n')) ++i;
  };
  auto hex4 = [&](size_t at) -> std::optional<char32_t> {
    if (at + 4 > line.size()) return std::nullopt;
    char32_t v = 0;
    for (size_t k = at; k < at + 4; ++k) {
      const char c = line[k];
      const int d = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
      if (d < 0) return std::nullopt;
      v = v * 16 + d;
    }
    return v;
  };
  skip_ws();
  if (i >= line.size() || line[i++] != '"') return std::nullopt;
  std::string out;
  while (true) {
    if (i >= line.size()) return std::nullopt;
    const char c = line[i++];
    if (c == '"') break;
    if (static_cast<unsigned char>(c) < 0x20) return std::nullopt;
    if (c != '\\') {
      out += c;
      continue;
    }
    if (i >= line.size()) return std::nullopt;
    const char e = line[i++];
    static const std::string_view kFrom = "\"\\/bfnrt", kTo = "\"\\/\b\f\n\r\t";
    if (const size_t k = kFrom.find(e); k != std::string_view::npos) {
      out += kTo[k];
      continue;
    }
    if (e != 'u') return std::nullopt;
    auto u = hex4(i);
    if (!u) return std::nullopt;
    i += 4;
    if (*u >= 0xD800 && *u < 0xDC00 && i + 1 < line.size() && line[i] == '\\' && line[i + 1] == 'u') {
      if (auto lo = hex4(i + 2); lo && *lo >= 0xDC00 && *lo < 0xE000) {
        *u = 0x10000 + ((*u - 0xD800) << 10) + (*lo - 0xDC00);
        i += 6;
      }
    }
    text::append_utf8(out, *u);
  }
  skip_ws();
  if (i != line.size()) return std::nullopt;
  return out;
}

std::string render_chat(const Tokenizer& tok, const std::string& line, const std::string& where) {
  nlohmann::ordered_json req;
  try {
    req = nlohmann::ordered_json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + ": invalid JSON: " + e.what());
  }
  check(req.is_object() && req.contains("messages"), where + ": expected an object with \"messages\"");
  const bool gen = req.value("add_generation_prompt", false);
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
  for (auto& [k, v] : req.items())
    if (k != "messages" && k != "add_generation_prompt") extra[k] = v;
  return tok.apply_chat_template(req["messages"], gen, &extra);
}

void run(const TokenizeOptions& o) {
  check(!(o.decode && o.chat), "hla tokenize: --decode and --chat exclude each other");
  const auto tok = Tokenizer::load(o.model);
  std::string out;
  auto flush = [&] {
    std::fwrite(out.data(), 1, out.size(), stdout);
    out.clear();
  };
  if (!o.jsonl) {
    const std::string input{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
    if (o.chat) {
      out = render_chat(*tok, input, "stdin");
    } else if (o.decode) {
      std::vector<int32_t> ids;
      std::string cur;
      for (size_t i = 0; i <= input.size(); ++i) {
        const char c = i < input.size() ? input[i] : ' ';
        if (c >= '0' && c <= '9') {
          cur += c;
          continue;
        }
        check(c == ' ' || c == ',' || c == '\n' || c == '\t' || c == '\r',
              std::string("stdin: '") + c + "' in a list of token ids");
        if (cur.empty()) continue;
        check(cur.size() <= 10 && std::stoll(cur) <= INT32_MAX, "stdin: token id " + cur + " is too large");
        ids.push_back(int32_t(std::stoll(cur)));
        cur.clear();
      }
      out = tok->decode(ids);
    } else {
      const auto ids = tok->encode(input);
      for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
      out += '\n';
    }
    flush();
    return;
  }
  std::string line;
  for (size_t n = 1; std::getline(std::cin, line); ++n) {
    const std::string where = "stdin line " + std::to_string(n);
    try {
      if (o.chat) {
        out += nlohmann::json(render_chat(*tok, line, where)).dump() + '\n';
      } else if (o.decode) {
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          throw Error(where + ": invalid JSON: " + e.what());
        }
        out += nlohmann::json(tok->decode(ids_of(j, where))).dump() + '\n';
      } else {
        std::string text;
        try {
          const auto j = nlohmann::json::parse(line);
          check(j.is_string(), where + ": expected a JSON string");
          text = j.get<std::string>();
        } catch (const nlohmann::json::exception& e) {
          auto s = json_string_keeping_surrogates(line);
          if (!s) throw Error(where + ": invalid JSON: " + e.what());
          text = std::move(*s);
        }
        out += '[';
        const auto ids = tok->encode(text);
        for (size_t i = 0; i < ids.size(); ++i) (out += i ? "," : "") += std::to_string(ids[i]);
        out += "]\n";
      }
    } catch (const Error& e) {
      flush();  // the lines before the bad one are answered
      throw Error(std::string(e.what()).starts_with("stdin") ? e.what() : where + ": " + e.what());
    }
    if (out.size() > (1 << 16)) flush();
  }
  flush();
}

}  // namespace

void register_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Token ids of text on stdin (or text of ids, or a rendered chat)");
  auto o = std::make_shared<TokenizeOptions>();
  cmd->add_option("--model", o->model, "model directory with tokenizer.json")->required();
  cmd->add_flag("--jsonl", o->jsonl, "one JSON value per input and output line");
  cmd->add_flag("--decode", o->decode, "decode token ids to text");
  cmd->add_flag("--chat", o->chat, "render the chat template of {messages, add_generation_prompt, ...}");
  cmd->callback([o] { run(*o); });
}

}  // namespace hla::cli
