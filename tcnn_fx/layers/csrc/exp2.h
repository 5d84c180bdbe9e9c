// 2^x on GCC vector types, shared by the layers' CPU kernels (attend_gather.cpp, attend_maps.cpp).
#pragma once

// 2^x for x <= 0 on a vector V of floats (I: the integer vector of the same lanes): x = n + f with n the
// nearest integer, 2^f by its degree-7 Taylor polynomial (relative error below 1e-8 for |f| <= 1/2), 2^n
// through the exponent bits; clamped at 2^-126.
template <typename V, typename I>
inline V exp2_nonpositive(V x) {
  const V floor = V{} - 126.0f;
  x = x < floor ? floor : x;
  const V round = V{} + 12582912.0f;  // 1.5 * 2^23
  const V n = (x + round) - round;
  const V f = x - n;
  V p = V{} + 1.5252734e-05f;
  p = p * f + 1.5403530e-04f;
  p = p * f + 1.3333558e-03f;
  p = p * f + 9.6181291e-03f;
  p = p * f + 5.5504109e-02f;
  p = p * f + 2.4022651e-01f;
  p = p * f + 6.9314718e-01f;
  p = p * f + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return p * (V)bits;
}
