// MSL keywords. In the emulator's first (preprocessing) pass they become marker
// identifiers that the rewriter can see; the compile pass defines the markers as
// clang address spaces. `thread` is the default address space.
#pragma once
#define device __msl_device
#define constant __msl_constant
#define threadgroup __msl_threadgroup
#define thread
#define kernel __msl_kernel
#ifndef METALEMU_PP
#define __msl_device __attribute__((address_space(1)))
#define __msl_constant __attribute__((address_space(2)))
#define __msl_threadgroup __attribute__((address_space(3)))
#define __msl_kernel
#endif
#define METAL_FUNC inline __attribute__((always_inline))
#define __METAL__ 1
#define __METAL_VERSION__ 320
#define __HAVE_BFLOAT__ 1
#define METALEMU 1
// Math-mode flags MLX's bf16_math.h passes to the __metal_* builtins (ignored here).
#define __METAL_FAST_MATH__ 1
#define __METAL_PRECISE_MATH__ 0
#define __METAL_MAYBE_FAST_MATH__ 0
// MSL's math constants (no <cmath> here: see math.h).
#define INFINITY __builtin_huge_valf()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_huge_valf()
#define M_PI_F 3.14159265358979323846f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LN2_F 0.69314718055994530942f
#define FLT_MAX 3.402823466e+38f
#define FLT_MIN 1.175494351e-38f
