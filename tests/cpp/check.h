// CHECK(cond, printf-args...) of the host unit tests in tests/cpp/: counts and prints
// (the first 20) failures in `failures`; main prints OK when there is none.
#pragma once

#include <cstdio>

static int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      if (++failures <= 20) {                                    \
        std::printf("FAIL line %d: %s: ", __LINE__, #cond);      \
        std::printf(__VA_ARGS__);                                \
        std::printf("\n");                                       \
      }                                                          \
    }                                                            \
  } while (0)
