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
