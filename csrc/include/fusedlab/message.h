// FL_CHECK / FL_CHECK_VALUE: TORCH_CHECK / TORCH_CHECK_VALUE with the message built here, numbers and
// shapes formatted with std::to_string / snprintf instead of std::ostream. On an H100 machine, an extension
// built there crashed (SIGSEGV) formatting an integer into a TORCH_CHECK message, while messages of only
// strings, dtypes and devices (whose index c10 formats with std::to_string) came through. As with
// TORCH_CHECK, the message is built only when the check fails. (Torch-dependent: glue code only.)
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fusedlab::detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace fusedlab::detail

#define FL_CHECK(cond, ...) TORCH_CHECK(cond, ::fusedlab::detail::message(__VA_ARGS__))
#define FL_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::fusedlab::detail::message(__VA_ARGS__))
