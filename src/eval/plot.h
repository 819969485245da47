// Line plots as PNG for the lab report, with no dependency: an RGB canvas, a 3×5 pixel font, and
// a PNG writer whose deflate stream uses fixed Huffman codes with run-length matches (distance 1),
// which is what flat-coloured plots compress well with.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace hla::eval {

struct Series {
  std::string label;
  std::vector<double> x, y;
};

// x on a log2 axis when log_x. Throws hla::Error if the file cannot be written.
void line_plot(const std::string& path, const std::string& title, const std::string& x_label, const std::string& y_label,
               const std::vector<Series>& series, bool log_x);

// Encodes an RGB image [h, w, 3] as PNG bytes.
std::string png_encode(const std::vector<uint8_t>& rgb, int w, int h);

}  // namespace hla::eval
