#include "eval/plot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "core/error.h"

namespace hla::eval {

namespace {

// ---- PNG -----------------------------------------------------------------------------------

uint32_t crc32(const uint8_t* p, size_t n, uint32_t c = 0) {
  static std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t x = i;
      for (int k = 0; k < 8; ++k) x = x & 1 ? 0xEDB88320u ^ (x >> 1) : x >> 1;
      t[i] = x;
    }
    return t;
  }();
  c = ~c;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return ~c;
}

struct BitWriter {
  std::string out;
  uint32_t acc = 0;
  int n = 0;
  void bits(uint32_t v, int count) {  // LSB first
    for (int i = 0; i < count; ++i) {
      acc |= ((v >> i) & 1u) << n;
      if (++n == 8) out.push_back(char(acc)), acc = 0, n = 0;
    }
  }
  void huff(uint32_t code, int len) {  // Huffman codes go MSB first
    for (int i = len - 1; i >= 0; --i) bits((code >> i) & 1u, 1);
  }
  void flush() {
    if (n) out.push_back(char(acc)), acc = 0, n = 0;
  }
};

void fixed_symbol(BitWriter& w, int sym) {
  if (sym < 144) w.huff(0x30 + sym, 8);
  else if (sym < 256) w.huff(0x190 + (sym - 144), 9);
  else if (sym < 280) w.huff(sym - 256, 7);
  else w.huff(0xC0 + (sym - 280), 8);
}

// zlib stream: one fixed-Huffman block, literals plus distance-1 matches for runs.
std::string zlib_rle(const std::vector<uint8_t>& d) {
  static const int base[] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
  static const int extra[] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
  BitWriter w;
  w.bits(1, 1), w.bits(1, 2);  // final block, fixed Huffman
  for (size_t i = 0; i < d.size();) {
    size_t run = 0;
    if (i > 0)
      while (i + run < d.size() && run < 258 && d[i + run] == d[i - 1]) ++run;
    if (run >= 3) {
      int c = 28;
      while (base[c] > int(run)) --c;
      fixed_symbol(w, 257 + c);
      w.bits(uint32_t(int(run) - base[c]), extra[c]);
      w.huff(0, 5);  // distance code 0 = distance 1
      i += run;
    } else {
      fixed_symbol(w, d[i++]);
    }
  }
  fixed_symbol(w, 256);
  w.flush();
  uint32_t a = 1, b = 0;
  for (uint8_t x : d) a = (a + x) % 65521, b = (b + a) % 65521;
  const uint32_t adler = (b << 16) | a;
  std::string z = "\x78\x01" + w.out;
  for (int s = 24; s >= 0; s -= 8) z.push_back(char((adler >> s) & 0xFF));
  return z;
}

void chunk(std::string& png, const char* type, const std::string& data) {
  const uint32_t n = uint32_t(data.size());
  for (int s = 24; s >= 0; s -= 8) png.push_back(char((n >> s) & 0xFF));
  std::string body = std::string(type, 4) + data;
  png += body;
  const uint32_t c = crc32(reinterpret_cast<const uint8_t*>(body.data()), body.size());
  for (int s = 24; s >= 0; s -= 8) png.push_back(char((c >> s) & 0xFF));
}

// ---- canvas and font -----------------------------------------------------------------------

struct Canvas {
  int w, h;
  std::vector<uint8_t> px;
  Canvas(int w_, int h_) : w(w_), h(h_), px(size_t(w_ * h_ * 3), 255) {}
  void set(int x, int y, std::array<uint8_t, 3> c) {
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    std::copy(c.begin(), c.end(), px.begin() + (size_t(y) * size_t(w) + size_t(x)) * 3);
  }
  void rect(int x0, int y0, int x1, int y1, std::array<uint8_t, 3> c) {
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) set(x, y, c);
  }
  void line(double x0, double y0, double x1, double y1, std::array<uint8_t, 3> c, int thick) {
    const int n = int(std::max(std::fabs(x1 - x0), std::fabs(y1 - y0))) + 1;
    for (int i = 0; i <= n; ++i) {
      const double t = double(i) / n;
      const int x = int(std::lround(x0 + t * (x1 - x0))), y = int(std::lround(y0 + t * (y1 - y0)));
      rect(x - thick / 2, y - thick / 2, x + (thick - 1) / 2, y + (thick - 1) / 2, c);
    }
  }
  // 3×5 glyphs at scale 2 (8 px advance); unknown characters draw as blanks.
  void text(int x, int y, const std::string& s, std::array<uint8_t, 3> c) {
    for (char ch : s) {
      const uint16_t g = glyph(ch);
      for (int r = 0; r < 5; ++r)
        for (int col = 0; col < 3; ++col)
          if (g >> (14 - (r * 3 + col)) & 1) rect(x + col * 2, y + r * 2, x + col * 2 + 1, y + r * 2 + 1, c);
      x += 8;
    }
  }
  static uint16_t glyph(char ch) {
    static const char* chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-:=()/_,%";
    static const uint8_t rows[][5] = {
        {7, 5, 5, 5, 7}, {2, 6, 2, 2, 7}, {7, 1, 7, 4, 7}, {7, 1, 7, 1, 7}, {5, 5, 7, 1, 1}, {7, 4, 7, 1, 7},
        {7, 4, 7, 5, 7}, {7, 1, 1, 1, 1}, {7, 5, 7, 5, 7}, {7, 5, 7, 1, 7}, {2, 5, 7, 5, 5}, {6, 5, 6, 5, 6},
        {3, 4, 4, 4, 3}, {6, 5, 5, 5, 6}, {7, 4, 6, 4, 7}, {7, 4, 6, 4, 4}, {3, 4, 5, 5, 3}, {5, 5, 7, 5, 5},
        {7, 2, 2, 2, 7}, {1, 1, 1, 5, 2}, {5, 5, 6, 5, 5}, {4, 4, 4, 4, 7}, {5, 7, 7, 5, 5}, {6, 5, 5, 5, 5},
        {2, 5, 5, 5, 2}, {6, 5, 6, 4, 4}, {2, 5, 5, 6, 3}, {6, 5, 6, 5, 5}, {3, 4, 2, 1, 6}, {7, 2, 2, 2, 2},
        {5, 5, 5, 5, 7}, {5, 5, 5, 5, 2}, {5, 5, 7, 7, 5}, {5, 5, 2, 5, 5}, {5, 5, 2, 2, 2}, {7, 1, 2, 4, 7},
        {0, 0, 0, 0, 2}, {0, 0, 7, 0, 0}, {0, 2, 0, 2, 0}, {0, 7, 0, 7, 0}, {1, 2, 2, 2, 1}, {4, 2, 2, 2, 4},
        {1, 1, 2, 4, 4}, {0, 0, 0, 0, 7}, {0, 0, 0, 2, 4}, {5, 1, 2, 4, 5}};
    const char u = char(std::toupper(static_cast<unsigned char>(ch)));
    const char* at = std::strchr(chars, u);
    if (!at || u == '\0') return 0;
    const auto& r = rows[at - chars];
    uint16_t g = 0;
    for (int i = 0; i < 5; ++i) g = uint16_t((g << 3) | r[i]);
    return g;
  }
};

std::string fmt(double v) {
  char b[32];
  if (std::fabs(v) >= 1000 || (std::fabs(v) < 0.01 && v != 0)) std::snprintf(b, sizeof b, "%.0e", v);
  else std::snprintf(b, sizeof b, "%.3g", v);
  return b;
}

}  // namespace

std::string png_encode(const std::vector<uint8_t>& rgb, int w, int h) {
  std::vector<uint8_t> raw;
  raw.reserve(size_t(h) * (size_t(w) * 3 + 1));
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);  // filter: none
    raw.insert(raw.end(), rgb.begin() + size_t(y) * size_t(w) * 3, rgb.begin() + size_t(y + 1) * size_t(w) * 3);
  }
  std::string png = "\x89PNG\r\n\x1a\n";
  std::string ihdr;
  for (uint32_t v : {uint32_t(w), uint32_t(h)})
    for (int s = 24; s >= 0; s -= 8) ihdr.push_back(char((v >> s) & 0xFF));
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit RGB
  chunk(png, "IHDR", ihdr);
  chunk(png, "IDAT", zlib_rle(raw));
  chunk(png, "IEND", "");
  return png;
}

void line_plot(const std::string& path, const std::string& title, const std::string& x_label, const std::string& y_label,
               const std::vector<Series>& series, bool log_x) {
  static const std::array<uint8_t, 3> colors[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},
                                                  {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {90, 90, 90}};
  const int W = 720, H = 440, L = 70, R = 200, T = 40, B = 50;
  Canvas c(W, H);
  auto tx = [&](double x) { return log_x ? std::log2(std::max(x, 1e-12)) : x; };
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (auto& s : series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      x0 = std::min(x0, tx(s.x[i])), x1 = std::max(x1, tx(s.x[i]));
      y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
    }
  if (!(x1 > x0)) x0 -= 1, x1 += 1;
  if (!(y1 > y0)) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  auto px = [&](double x) { return L + (tx(x) - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };
  const std::array<uint8_t, 3> black{0, 0, 0}, grey{200, 200, 200};
  for (int i = 0; i <= 4; ++i) {  // horizontal grid with y tick labels
    const double y = y0 + (y1 - y0) * i / 4;
    c.line(L, py(y), W - R, py(y), grey, 1);
    c.text(4, int(py(y)) - 5, fmt(y), black);
  }
  c.line(L, T, L, H - B, black, 1);
  c.line(L, H - B, W - R, H - B, black, 1);
  std::vector<double> xt;
  for (auto& s : series) xt.insert(xt.end(), s.x.begin(), s.x.end());
  std::sort(xt.begin(), xt.end());
  xt.erase(std::unique(xt.begin(), xt.end()), xt.end());
  const size_t every = std::max<size_t>(1, xt.size() / 8);
  for (size_t i = 0; i < xt.size(); i += every) c.text(int(px(xt[i])) - 8, H - B + 8, fmt(xt[i]), black);
  c.text(L, 12, title, black);
  c.text((W - R) / 2 - int(x_label.size()) * 4, H - 20, x_label, black);
  c.text(4, T - 20, y_label, black);
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& s = series[k];
    const auto col = colors[k % 8];
    for (size_t i = 0; i + 1 < s.x.size(); ++i)
      if (std::isfinite(s.y[i]) && std::isfinite(s.y[i + 1])) c.line(px(s.x[i]), py(s.y[i]), px(s.x[i + 1]), py(s.y[i + 1]), col, 2);
    for (size_t i = 0; i < s.x.size(); ++i)
      if (std::isfinite(s.y[i])) c.rect(int(px(s.x[i])) - 2, int(py(s.y[i])) - 2, int(px(s.x[i])) + 2, int(py(s.y[i])) + 2, col);
    c.rect(W - R + 12, T + 6 + int(k) * 18, W - R + 30, T + 10 + int(k) * 18, col);
    c.text(W - R + 36, T + 3 + int(k) * 18, s.label, black);
  }
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << png_encode(c.px, W, H);
  check(bool(f), path + ": cannot write");
}

}  // namespace hla::eval
