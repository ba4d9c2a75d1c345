// The interface between kernel code (through the shim) and the emulator runtime
// (runtime/runtime.cpp). Plain C++: no MSL keyword macros are in effect here.
#pragma once
#include <cstddef>
#include <cstdint>

namespace metalemu {

struct u3 {
  uint32_t x, y, z;
};

// Everything a lane can ask about its position (the MSL [[thread_*]] attributes).
struct LaneCtx {
  u3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  u3 threads_per_threadgroup, threads_per_grid, threadgroups_per_grid;
  uint32_t thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup, threads_per_simdgroup;
};

// Bytes each lane deposits at most in one simdgroup collective.
constexpr unsigned kSlot = 128;

const LaneCtx* lane();
// threadgroup_barrier: parks the lane until every live lane of the threadgroup arrives.
void barrier(unsigned flags);
// A simdgroup collective: deposits `size` bytes, parks until every live lane of the
// simdgroup has deposited, returns the 32 slots (kSlot bytes apart) and the live mask.
const unsigned char* simd_exchange(const void* value, unsigned size, uint32_t* active);
// Threadgroup memory declared in a kernel body: one block per (declaration, threadgroup),
// poisoned with 0xFF when the threadgroup first touches it, a guard page right after it.
void* tg_alloc(const void* key, size_t size, size_t align, const char* name);
// Threadgroup memory passed as a [[threadgroup(i)]] kernel argument.
void* tg_arg(unsigned index);
// Function constants ([[function_constant(i)]]): storage for index i (set per launch).
const void* function_constant(unsigned index, size_t size);
bool function_constant_defined(unsigned index);
// Fails the launch with a message (kernel-side checks).
void fail(const char* message);

}  // namespace metalemu

// The launch interface of a compiled kernel library (what emulator.py calls via ctypes).
extern "C" {
struct metalemu_report {
  int error;          // 0 ok, 1 emulator error (deadlock, ...), 2 fault (out of bounds, ...)
  int fault_write;    // for a fault: 1 if the access was a write
  uint64_t fault_addr;
  uint64_t file_base;  // where the launch file was mapped (to locate a fault)
  uint32_t lane_tid[3], lane_tg[3];  // thread_position_in_threadgroup / threadgroup_position_in_grid
  int64_t barriers, simd_ops, switches, exited_before_barrier;
  char msg[1024];
};
typedef void (*metalemu_body)(void** buffers, const metalemu::LaneCtx* ctx);
// tg_arg_bytes[i]: size of the [[threadgroup(i)]] argument block (0 if unused).
int metalemu_launch(metalemu_body body, void** buffers, const uint32_t* threadgroups,
                    const uint32_t* threads, uint32_t seed, const uint64_t* tg_arg_bytes,
                    int n_tg_args, metalemu_report* report);
// A launch described in a shared file (written by emulator.py, run by the runner
// process so that a fault cannot take pytest down): this header, then page-aligned
// buffer regions, each between PROT_NONE guard pages.
#define METALEMU_MAX_BUFFERS 64
#define METALEMU_MAX_GUARDS 130
struct metalemu_file {
  uint64_t magic;  // METALEMU_MAGIC
  uint32_t threadgroups[3], threads[3];
  uint32_t seed, n_guards;
  uint64_t tg_bytes[32];                         // [[threadgroup(i)]] sizes
  uint64_t buffer_offset[METALEMU_MAX_BUFFERS];  // file offset of [[buffer(i)]] data
  uint64_t guard_offset[METALEMU_MAX_GUARDS];    // file offsets of guard pages
  uint32_t n_constants, pad;
  struct { uint32_t index, size; uint64_t value; } constants[32];  // function constants
  metalemu_report report;
};
#define METALEMU_MAGIC 0x554d454c4154454dull
// Maps the file, protects its guard pages, runs `body`, leaves the report in the file.
int metalemu_run_file(const char* path, metalemu_body body);
// Installs the SIGSEGV/SIGBUS handler that turns a fault into a report (child process).
void metalemu_install_fault_handler(metalemu_report* report);
}
