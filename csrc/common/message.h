// Numbers and shapes as text for error messages.
//
// Why: on the H200 machine (Ubuntu 24.04, g++ 13.3, nvcc 13.0, torch 2.11+cu130) the extension built
// there carries its own weak copy of std::ostream::_M_insert<long> (`nm -D` shows it as W), and the
// extension binds to that copy (its link uses -Bsymbolic-functions). Inserting an integer into a stream
// then crashed the process (SIGSEGV under c10::str), while inserting strings worked. TORCH_CHECK formats
// its message arguments through an ostringstream. So the messages here turn numbers and shapes into
// std::string first (std::to_string does not use iostreams) and pass only text.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace mmdcnv4 {

inline std::string int_text(int64_t value) { return std::to_string(value); }

inline std::string shape_text(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(sizes[i]);
  }
  return text + "]";
}

}  // namespace mmdcnv4
