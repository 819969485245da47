// hla errors: every bad input ends in one hla::Error whose message is a single line naming the
// file, tensor or field at fault. The CLI prints it and exits 1; the server turns it into a 4xx.
#pragma once
#include <stdexcept>
#include <string>

namespace hla {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// check(cond, "msg") — throws hla::Error(msg) when cond is false. For input validation, not
// internal invariants (those stay asserts).
inline void check(bool cond, const std::string& msg) {
  if (!cond) throw Error(msg);
}

}  // namespace hla
