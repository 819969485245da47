#include "eval/tasks.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace hla::eval {

namespace {

constexpr int64_t PAD = 0, SEP = 1, QRY = 2, IGN = -100;

int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {  // [lo, hi)
  return lo + int64_t(rng() % uint64_t(hi - lo));
}
// k distinct values from [lo, hi)
std::vector<int64_t> distinct(std::mt19937_64& rng, int64_t lo, int64_t hi, int64_t k) {
  std::vector<int64_t> all(static_cast<size_t>(hi - lo));
  std::iota(all.begin(), all.end(), lo);
  for (int64_t i = 0; i < k; ++i) std::swap(all[size_t(i)], all[size_t(uniform(rng, i, hi - lo))]);
  all.resize(size_t(k));
  return all;
}
void push(Example& e, int64_t id, int64_t label = IGN) {
  e.ids.push_back(id);
  e.labels.push_back(label);
}

// MQAR (Zoology multiquery_ar): k1 v1 .. kN vN, then a query region of L−2N tokens where the N keys
// reappear at gap slots g (P(g) ∝ (g+1)^(a−1), a = power_a) followed by their value; the label on a
// query key is its value. Other query-region tokens are random keys/values (random_non_queries).
// seq_len 0 = compact: L = 4N, every slot a query (the N queries in random order, no filler).
struct Mqar : Task {
  int64_t seq_len, nk, nv;
  double power_a = 0.01;
  Mqar(int64_t L_, int64_t nk_, int64_t nv_, std::vector<int64_t> tr, std::vector<int64_t> te) : seq_len(L_), nk(nk_), nv(nv_) {
    name = "mqar", level_name = "pairs", train_levels = tr, test_levels = te, vocab = 4 + nk + nv;
    params = {{"seq_len", L_ > 0 ? nlohmann::json(L_) : nlohmann::json("4·pairs")}, {"key_vocab", nk}, {"value_vocab", nv},
              {"power_a", power_a}, {"random_non_queries", L_ > 0}, {"train_pairs", tr}, {"test_pairs", te}};
  }
  Example sample(std::mt19937_64& rng, int64_t N, bool) const override {
    const int64_t L = seq_len > 0 ? seq_len : 4 * N;
    check(4 * N <= L && N <= nk, "mqar: needs 4·pairs <= seq_len and pairs <= key vocab");
    const auto keys = distinct(rng, 4, 4 + nk, N);
    std::vector<int64_t> vals(static_cast<size_t>(N));
    for (auto& v : vals) v = uniform(rng, 4 + nk, 4 + nk + nv);
    Example e;
    for (int64_t i = 0; i < N; ++i) push(e, keys[size_t(i)]), push(e, vals[size_t(i)]);
    const int64_t slots = (L - 2 * N) / 2;
    std::vector<double> w(static_cast<size_t>(slots));
    for (int64_t g = 0; g < slots; ++g) w[size_t(g)] = power_a * std::pow(double(g + 1), power_a - 1);
    std::vector<int64_t> gap;  // N distinct slots, weighted, without replacement
    for (int64_t i = 0; i < N; ++i) {
      std::discrete_distribution<int64_t> d(w.begin(), w.end());
      const int64_t g = d(rng);
      gap.push_back(g);
      w[size_t(g)] = 0;
    }
    std::vector<int64_t> region(static_cast<size_t>(L - 2 * N)), lab(region.size(), IGN);
    for (auto& t : region) t = uniform(rng, 4, 4 + nk + nv);
    for (int64_t i = 0; i < N; ++i) {
      const size_t at = size_t(2 * gap[size_t(i)]);
      region[at] = keys[size_t(i)], region[at + 1] = vals[size_t(i)], lab[at] = vals[size_t(i)];
    }
    for (size_t i = 0; i < region.size(); ++i) push(e, region[i], lab[i]);
    return e;
  }
};

// Multi-hop associative recall: C disjoint chains x0→x1→…→xh (x0..x_{h−1} keys, xh a value), all
// C·h edges "a b" shuffled, then SEP, HOP_h, and Q queries "x0 xh" labelled xh on x0.
struct MultiHop : Task {
  int64_t chains, queries, nk, nv;
  MultiHop(int64_t C, int64_t Q, int64_t nk_, int64_t nv_) : chains(C), queries(Q), nk(nk_), nv(nv_) {
    name = "multihop", level_name = "hops", train_levels = {1, 2, 3, 4}, test_levels = {1, 2, 3, 4};
    // With all hop counts mixed from the start, the smoke models settled on eliminating answered
    // values (attention 0.37 at every hop count) and never learned even one hop.
    curriculum = true;
    vocab = 8 + nk + nv;  // 4..7: HOP_1..HOP_4
    params = {{"chains", C},
              {"queries", Q},
              {"key_vocab", nk},
              {"value_vocab", nv},
              {"edge_order", "shuffled"},
              {"hops", train_levels},
              {"curriculum", "hops 1, then 1-2, 1-3, 1-4 over quarters of the steps"}};
  }
  Example sample(std::mt19937_64& rng, int64_t h, bool) const override {
    const auto keys = distinct(rng, 8, 8 + nk, chains * h);
    std::vector<std::vector<int64_t>> ch(static_cast<size_t>(chains));
    std::vector<std::pair<int64_t, int64_t>> edges;
    for (int64_t c = 0; c < chains; ++c) {
      for (int64_t j = 0; j < h; ++j) ch[size_t(c)].push_back(keys[size_t(c * h + j)]);
      ch[size_t(c)].push_back(uniform(rng, 8 + nk, 8 + nk + nv));
      for (int64_t j = 0; j < h; ++j) edges.emplace_back(ch[size_t(c)][size_t(j)], ch[size_t(c)][size_t(j + 1)]);
    }
    std::shuffle(edges.begin(), edges.end(), rng);
    Example e;
    for (auto& [a, b] : edges) push(e, a), push(e, b);
    push(e, SEP), push(e, 3 + h);
    for (int64_t c : distinct(rng, 0, chains, queries)) push(e, ch[size_t(c)][0], ch[size_t(c)].back()), push(e, ch[size_t(c)].back());
    return e;
  }
};

// Needle in a haystack (RULER niah_single_2 in tokens): Zipf(1.1) filler of length `level`, one
// needle [NDL k1 k2 v1..vm] at one of 40 evenly spaced depths, then [QRY k1 k2] and the value
// (teacher-forced; exact match of all m value tokens).
struct Niah : Task {
  int64_t filler, key_vocab, m;
  Niah(int64_t f, int64_t kv, int64_t m_, std::vector<int64_t> tr, std::vector<int64_t> te) : filler(f), key_vocab(kv), m(m_) {
    name = "niah", level_name = "length", train_levels = tr, test_levels = te, exact_match = true;
    vocab = 4 + 10 + kv + f;  // 3 = NDL, 4..13 digits, then keys, then filler
    params = {{"filler_vocab", f}, {"filler_zipf", 1.1}, {"key_tokens", 2}, {"key_vocab", kv}, {"value_digits", m},
              {"depths", 40}, {"train_lengths", tr}, {"test_lengths", te}};
  }
  Example sample(std::mt19937_64& rng, int64_t L, bool) const override {
    std::vector<double> zw(static_cast<size_t>(filler));
    for (int64_t i = 0; i < filler; ++i) zw[size_t(i)] = 1.0 / std::pow(double(i + 1), 1.1);
    std::discrete_distribution<int64_t> zipf(zw.begin(), zw.end());
    const int64_t k0 = 14, f0 = 14 + key_vocab;
    const int64_t k1 = uniform(rng, k0, k0 + key_vocab), k2 = uniform(rng, k0, k0 + key_vocab);
    std::vector<int64_t> val(static_cast<size_t>(m));
    for (auto& d : val) d = uniform(rng, 4, 14);
    const int64_t hay = std::max<int64_t>(1, L - (3 + m) - (3 + m));
    const int64_t depth = int64_t(double(uniform(rng, 0, 40)) / 39.0 * double(hay));
    Example e;
    for (int64_t t = 0; t <= hay; ++t) {
      if (t == depth) {
        push(e, 3), push(e, k1), push(e, k2);
        for (int64_t d : val) push(e, d);
      }
      if (t < hay) push(e, f0 + zipf(rng));
    }
    push(e, QRY), push(e, k1);
    push(e, k2, val[0]);
    for (int64_t i = 0; i < m; ++i) push(e, val[size_t(i)], i + 1 < m ? val[size_t(i + 1)] : IGN);
    return e;
  }
};

// Copying: [SEP s SEP] then s again (labels on the copy); selective copying (MAD): n data tokens
// at random places among L−n blanks, then SEP and the data tokens in order.
struct Copy : Task {
  int64_t alphabet, ctx;  // ctx > 0: selective copying in a context of ctx tokens
  Copy(bool selective, int64_t a, int64_t c, std::vector<int64_t> tr, std::vector<int64_t> te) : alphabet(a), ctx(selective ? c : 0) {
    name = selective ? "selective_copy" : "copy", level_name = "tokens", train_levels = tr, test_levels = te;
    vocab = 4 + a;  // 3 = blank
    params = {{"alphabet", a}, {"train_tokens", tr}, {"test_tokens", te}};
    if (selective) params["context"] = c;
  }
  Example sample(std::mt19937_64& rng, int64_t n, bool) const override {
    std::vector<int64_t> s(static_cast<size_t>(n));
    for (auto& x : s) x = uniform(rng, 4, 4 + alphabet);
    Example e;
    push(e, SEP);
    if (ctx > 0) {
      std::vector<int64_t> pos = distinct(rng, 0, std::max(ctx, n), n);
      std::sort(pos.begin(), pos.end());
      size_t j = 0;
      for (int64_t t = 0; t < std::max(ctx, n); ++t) push(e, j < pos.size() && pos[j] == t ? s[j++] : 3);
    } else {
      for (int64_t x : s) push(e, x);
    }
    push(e, SEP, s[0]);
    for (int64_t i = 0; i + 1 < n; ++i) push(e, s[size_t(i)], s[size_t(i + 1)]);
    return e;
  }
};

// Parity: bits (tokens 4, 5); training labels the running parity at every position, a test
// example only the parity of the whole string (Grazzi et al.).
struct Parity : Task {
  Parity(std::vector<int64_t> tr, std::vector<int64_t> te) {
    name = "parity", level_name = "length", train_levels = tr, test_levels = te, vocab = 6;
    params = {{"train_lengths", tr}, {"test_lengths", te}, {"train_labels", "running parity at every position"},
              {"test_labels", "parity of the whole string (last position)"}};
  }
  Example sample(std::mt19937_64& rng, int64_t n, bool test) const override {
    Example e;
    int64_t p = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t b = int64_t(rng() & 1);
      p ^= b;
      push(e, 4 + b, !test || t == n - 1 ? 4 + p : IGN);
    }
    return e;
  }
};

// S5 word problem: tokens are the 120 permutations of 5 elements; the label at every position is
// the prefix product. Test examples score only positions beyond the longest training length.
struct S5 : Task {
  std::vector<std::array<int, 5>> perms;
  int64_t train_max;
  S5(std::vector<int64_t> tr, std::vector<int64_t> te) {
    name = "s5", level_name = "length", train_levels = tr, test_levels = te, vocab = 4 + 120;
    train_max = *std::max_element(tr.begin(), tr.end());
    std::array<int, 5> p{0, 1, 2, 3, 4};
    do perms.push_back(p);
    while (std::next_permutation(p.begin(), p.end()));
    params = {{"train_lengths", tr}, {"test_lengths", te}, {"scored_positions", "all (train); > longest train length (test)"}};
  }
  int64_t index(const std::array<int, 5>& p) const {
    return int64_t(std::lower_bound(perms.begin(), perms.end(), p) - perms.begin());
  }
  Example sample(std::mt19937_64& rng, int64_t n, bool test) const override {
    Example e;
    std::array<int, 5> acc{0, 1, 2, 3, 4};
    for (int64_t t = 0; t < n; ++t) {
      const int64_t g = uniform(rng, 0, 120);
      std::array<int, 5> next;
      for (int i = 0; i < 5; ++i) next[size_t(i)] = perms[size_t(g)][size_t(acc[size_t(i)])];
      acc = next;
      const bool scored = !test || n <= train_max || t >= train_max;
      push(e, 4 + g, scored ? 4 + index(acc) : IGN);
    }
    return e;
  }
};

// Induction head (Mamba): random symbols from 16, TRIG at p < L−2 followed by y, the sequence ends
// with TRIG; label y at the last position.
struct Induction : Task {
  Induction(std::vector<int64_t> tr, std::vector<int64_t> te) {
    name = "induction", level_name = "length", train_levels = tr, test_levels = te, vocab = 4 + 16;
    params = {{"symbols", 16}, {"trigger", 3}, {"train_lengths", tr}, {"test_lengths", te}};
  }
  Example sample(std::mt19937_64& rng, int64_t L, bool) const override {
    Example e;
    const int64_t p = uniform(rng, 0, L - 2), y = uniform(rng, 4, 20);
    for (int64_t t = 0; t < L - 1; ++t) push(e, t == p ? 3 : t == p + 1 ? y : uniform(rng, 4, 20));
    push(e, 3, y);
    return e;
  }
};

}  // namespace

std::vector<std::string> task_names() {
  return {"mqar", "multihop", "niah", "copy", "selective_copy", "parity", "s5", "induction"};
}

std::unique_ptr<Task> make_task(const std::string& name, const std::string& preset) {
  check(preset == "smoke" || preset == "standard", "preset must be smoke or standard (is '" + preset + "')");
  const bool s = preset == "smoke";
  if (name == "mqar")
    return s ? std::make_unique<Mqar>(0, 32, 32, std::vector<int64_t>{4, 8, 16}, std::vector<int64_t>{4, 8, 16})
             : std::make_unique<Mqar>(256, 256, 256, std::vector<int64_t>{8, 16, 32}, std::vector<int64_t>{8, 16, 32, 48, 64});
  if (name == "multihop") return s ? std::make_unique<MultiHop>(8, 8, 64, 32) : std::make_unique<MultiHop>(16, 16, 256, 128);
  if (name == "niah")
    return s ? std::make_unique<Niah>(32, 32, 3, std::vector<int64_t>{64, 128}, std::vector<int64_t>{64, 128, 256})
             : std::make_unique<Niah>(256, 256, 7, std::vector<int64_t>{256, 512}, std::vector<int64_t>{256, 512, 1024, 2048});
  if (name == "copy" || name == "selective_copy") {
    const bool sel = name == "selective_copy";
    return s ? std::make_unique<Copy>(sel, 16, 64, std::vector<int64_t>{8, 16, 24}, std::vector<int64_t>{8, 16, 32, 48})
             : std::make_unique<Copy>(sel, 32, 256, std::vector<int64_t>{32, 64, 96, 128}, std::vector<int64_t>{64, 128, 192, 256});
  }
  if (name == "parity")
    return s ? std::make_unique<Parity>(std::vector<int64_t>{4, 8, 16, 24, 32}, std::vector<int64_t>{32, 64, 128})
             : std::make_unique<Parity>(std::vector<int64_t>{3, 10, 20, 30, 40}, std::vector<int64_t>{40, 64, 128, 256});
  if (name == "s5")
    return s ? std::make_unique<S5>(std::vector<int64_t>{8, 16, 24, 32}, std::vector<int64_t>{32, 64, 128})
             : std::make_unique<S5>(std::vector<int64_t>{16, 32, 48, 64}, std::vector<int64_t>{64, 128, 256, 512});
  if (name == "induction")
    return s ? std::make_unique<Induction>(std::vector<int64_t>{64}, std::vector<int64_t>{64, 128, 256, 512})
             : std::make_unique<Induction>(std::vector<int64_t>{256}, std::vector<int64_t>{256, 512, 2048, 8192});
  throw Error("unknown task '" + name + "' (mqar, multihop, niah, copy, selective_copy, parity, s5, induction)");
}

}  // namespace hla::eval
