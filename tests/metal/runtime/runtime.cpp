// The Metal emulator's runtime: runs one threadgroup at a time, each lane a fiber on one
// OS thread. Lanes switch only at sync points (threadgroup_barrier, simd_* collectives,
// exit), so the schedule is fully decided here, from the seed:
//   seed 0  - lockstep: simdgroups advance one sync step each, in index order;
//   seed >0 - random: a random simdgroup runs ahead for a random number of sync steps
//             (often up to its next barrier), lanes of a simdgroup resume in random order.
// A kernel that lacks a barrier reads stale or poisoned threadgroup memory under some
// of these orders. Threadgroup memory is poisoned (0xFF) per threadgroup and followed by
// a PROT_NONE guard page; a fault becomes a report through the signal handler.
#include "metalemu/rt.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace metalemu {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStack = 256 * 1024;      // per lane, reserved lazily (MAP_NORESERVE)
constexpr size_t kArena = 8 * 1024 * 1024; // threadgroup memory address space
constexpr size_t kTgLimit = 32 * 1024;     // Apple GPUs: 32 KiB per threadgroup

enum State { RUNNABLE, AT_SIMD, AT_BARRIER, DONE };

struct Lane {
  void* sp;  // saved stack pointer while switched out
  char* stack_top;
  State st;
  LaneCtx c;
};

struct Simd {
  unsigned char buf[2][32][kSlot];
  uint32_t active[2];
  unsigned gen;
};

struct TgBlock {
  const void* key;
  unsigned char* ptr;
  size_t size;
  long group;  // threadgroup that last poisoned it
  const char* name;
};

struct Launch {
  metalemu_body body;
  void** buffers;
  metalemu_report* rep;
  std::vector<Lane> lanes;
  std::vector<Simd> simds;
  std::vector<TgBlock> blocks;
  std::vector<size_t> tg_args;  // bytes of each [[threadgroup(i)]] argument, 0 = not given
  unsigned char* arena = nullptr;
  size_t arena_used = 0, tg_bytes = 0;
  long group = 0;
  void* sched_sp = nullptr;
  Lane* cur = nullptr;
  std::mt19937 rng;
};

Launch* L = nullptr;
metalemu_report* g_fault_report = nullptr;

}  // namespace
}  // namespace metalemu

// ---- context switch ------------------------------------------------------------------
// metalemu_switch(&save_sp, new_sp): saves callee-saved registers and the FP control
// words on the current stack, stores the stack pointer, switches, restores. ~10 ns.
extern "C" void metalemu_switch(void** save_sp, void* new_sp);
extern "C" void metalemu_fiber_main(metalemu::Lane* lane);
#if defined(__x86_64__)
asm(R"(
.text
.globl metalemu_switch
.type metalemu_switch,@function
metalemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size metalemu_switch,.-metalemu_switch
.globl metalemu_trampoline
.type metalemu_trampoline,@function
metalemu_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  call metalemu_fiber_main
  ud2
.size metalemu_trampoline,.-metalemu_trampoline
)");
extern "C" void metalemu_trampoline();
#else
#error "the Metal emulator's fibers need x86_64 (add a context switch for this CPU)"
#endif

namespace metalemu {
namespace {

// A fresh fiber's stack, laid out as metalemu_switch leaves it: FP control words, six
// registers (r12 = the lane), and the trampoline as the return address.
void* init_stack(Lane* lane) {
  uint64_t* top = (uint64_t*)lane->stack_top;  // 16-byte aligned
  uint64_t* sp = top - 9;
  uint32_t fpctl[2] = {0x1F80, 0x037F};  // default MXCSR, x87 control word
  std::memcpy(&sp[0], fpctl, 8);
  sp[1] = 0;                // r15
  sp[2] = 0;                // r14
  sp[3] = 0;                // r13
  sp[4] = (uint64_t)lane;   // r12
  sp[5] = 0;                // rbx
  sp[6] = 0;                // rbp
  sp[7] = (uint64_t)&metalemu_trampoline;
  sp[8] = 0;
  return sp;
}

void set_error(int code, const char* msg) {
  if (L->rep->error) return;
  L->rep->error = code;
  snprintf(L->rep->msg, sizeof L->rep->msg, "%s", msg);
}

void park(State st) {
  Lane* l = L->cur;
  l->st = st;
  L->rep->switches++;
  metalemu_switch(&l->sp, L->sched_sp);
}

void run_lane(Lane* l) {
  L->cur = l;
  metalemu_switch(&L->sched_sp, l->sp);
  L->cur = nullptr;
}

// Live lanes of simdgroup s: are they all parked at a simd op? Then complete it.
bool try_complete_simd(unsigned s) {
  unsigned base = s * 32, n = std::min<unsigned>(32, L->lanes.size() - base);
  uint32_t mask = 0;
  bool at_barrier = false;
  for (unsigned i = 0; i < n; i++) {
    State st = L->lanes[base + i].st;
    if (st == RUNNABLE) return false;
    if (st == AT_SIMD) mask |= 1u << i;
    if (st == AT_BARRIER) at_barrier = true;
  }
  if (!mask) return false;
  if (at_barrier) {
    char m[256];
    snprintf(m, sizeof m,
             "simdgroup %u diverged: some lanes wait at a simd_* operation, others at "
             "threadgroup_barrier (deadlock on a GPU)",
             s);
    set_error(1, m);
    return false;
  }
  Simd& sg = L->simds[s];
  unsigned g = sg.gen & 1;
  for (unsigned i = 0; i < 32; i++)
    if (!((mask >> i) & 1)) std::memset(sg.buf[g][i], 0xFF, kSlot);
  sg.active[g] = mask;
  sg.gen++;
  for (unsigned i = 0; i < n; i++)
    if (L->lanes[base + i].st == AT_SIMD) L->lanes[base + i].st = RUNNABLE;
  L->rep->simd_ops++;
  return true;
}

// Runs every runnable lane of simdgroup s to its next sync point (random lane order
// unless lockstep), then completes its collective if all lanes reached it.
bool step_simd(unsigned s, bool lockstep) {
  unsigned base = s * 32, n = std::min<unsigned>(32, L->lanes.size() - base);
  unsigned order[32];
  for (unsigned i = 0; i < n; i++) order[i] = i;
  if (!lockstep) std::shuffle(order, order + n, L->rng);
  bool ran = false;
  for (unsigned i = 0; i < n && !L->rep->error; i++) {
    Lane* l = &L->lanes[base + order[i]];
    if (l->st == RUNNABLE) {
      run_lane(l);
      ran = true;
    }
  }
  return try_complete_simd(s) || ran;
}

void run_group(u3 gpos, u3 tgs, u3 tpg, bool lockstep, double stay) {
  unsigned n = tpg.x * tpg.y * tpg.z, nsimd = (n + 31) / 32;
  L->group++;
  for (unsigned i = 0; i < n; i++) {
    Lane& l = L->lanes[i];
    u3 t = {i % tpg.x, (i / tpg.x) % tpg.y, i / (tpg.x * tpg.y)};
    u3 grid = {tgs.x * tpg.x, tgs.y * tpg.y, tgs.z * tpg.z};
    l.c = LaneCtx{{gpos.x * tpg.x + t.x, gpos.y * tpg.y + t.y, gpos.z * tpg.z + t.z},
                  t, gpos, tpg, grid, tgs, i, i % 32, i / 32, nsimd, 32};
    l.st = RUNNABLE;
    l.sp = init_stack(&l);
  }
  for (auto& s : L->simds) s.gen = 0;
  std::vector<unsigned> order(nsimd);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  for (;;) {
    // One barrier epoch: run simdgroups until none can move.
    for (unsigned k = 0; k < nsimd; k++) order[k] = k;
    if (!lockstep) std::shuffle(order.begin(), order.end(), L->rng);
    bool moved = true;
    while (moved && !L->rep->error) {
      moved = false;
      for (unsigned s : order) {
        if (lockstep) {
          moved |= step_simd(s, true);
        } else {  // run ahead: keep stepping s while the coin says stay
          while (step_simd(s, false)) {
            moved = true;
            if (L->rep->error || coin(L->rng) >= stay) break;
          }
        }
        if (L->rep->error) return;
      }
      if (!lockstep) std::shuffle(order.begin(), order.end(), L->rng);
    }
    if (L->rep->error) return;
    unsigned done = 0, at_simd = 0;
    for (unsigned i = 0; i < n; i++) {
      done += L->lanes[i].st == DONE;
      at_simd += L->lanes[i].st == AT_SIMD;
    }
    if (done == n) return;
    if (at_simd) {
      set_error(1, "deadlock: a simd_* operation was never reached by all live lanes of its simdgroup");
      return;
    }
    if (done) L->rep->exited_before_barrier++;
    for (unsigned i = 0; i < n; i++)
      if (L->lanes[i].st == AT_BARRIER) L->lanes[i].st = RUNNABLE;
    L->rep->barriers++;
  }
}

void* arena_place(const void* key, size_t size, size_t align, const char* name) {
  for (auto& b : L->blocks)
    if (b.key == key) return b.ptr;
  L->tg_bytes += size;
  if (L->tg_bytes > kTgLimit) {
    char m[256];
    snprintf(m, sizeof m, "threadgroup memory %zu bytes exceeds the 32 KiB of Apple GPUs (at '%s')",
             L->tg_bytes, name);
    set_error(1, m);
  }
  // End-aligned against a PROT_NONE page, so running past the end faults.
  size_t pages = (size + kPage - 1) / kPage;
  if (size == 0) pages = 1;
  if (L->arena_used + (pages + 1) * kPage > kArena) {
    set_error(1, "threadgroup memory: emulator arena exhausted");
    return L->arena;
  }
  unsigned char* region = L->arena + L->arena_used;
  mprotect(region, pages * kPage, PROT_READ | PROT_WRITE);
  L->arena_used += (pages + 1) * kPage;
  unsigned char* end = region + pages * kPage;
  unsigned char* p = (unsigned char*)((uintptr_t)(end - size) & ~(uintptr_t)(align ? align - 1 : 0));
  L->blocks.push_back({key, p, size, -1, name});
  return p;
}

unsigned char g_tg_arg_keys[32];

}  // namespace

const LaneCtx* lane() { return &L->cur->c; }

void barrier(unsigned) { park(AT_BARRIER); }

const unsigned char* simd_exchange(const void* value, unsigned size, uint32_t* active) {
  Lane* l = L->cur;
  Simd& sg = L->simds[l->c.simdgroup_index_in_threadgroup];
  unsigned g = sg.gen & 1;
  if (size > kSlot) fail("simd_* value larger than the emulator's slot");
  if (size) std::memcpy(sg.buf[g][l->c.thread_index_in_simdgroup], value, size);
  park(AT_SIMD);
  *active = sg.active[g];
  return &sg.buf[g][0][0];
}

void* tg_alloc(const void* key, size_t size, size_t align, const char* name) {
  void* p = arena_place(key, size, align, name);
  for (auto& b : L->blocks)
    if (b.key == key && b.group != L->group) {
      std::memset(b.ptr, 0xFF, b.size);  // uninitialised threadgroup memory reads as NaN / -1
      b.group = L->group;
    }
  return p;
}

void* tg_arg(unsigned index) {
  if (index >= L->tg_args.size() || L->tg_args[index] == 0) {
    char m[128];
    snprintf(m, sizeof m, "[[threadgroup(%u)]] argument has no size (pass threadgroup_bytes)", index);
    fail(m);
    return L->arena;
  }
  return tg_alloc(&g_tg_arg_keys[index % 32], L->tg_args[index], 16, "[[threadgroup]] argument");
}

void fail(const char* message) { set_error(1, message); }

namespace {
constexpr unsigned kConstants = 1024;
uint64_t g_constants[kConstants];
bool g_constant_defined[kConstants];
}  // namespace
const void* function_constant(unsigned index, size_t) { return &g_constants[index % kConstants]; }
bool function_constant_defined(unsigned index) { return g_constant_defined[index % kConstants]; }

}  // namespace metalemu

using namespace metalemu;

extern "C" void metalemu_fiber_main(Lane* lane) {
  L->body(L->buffers, &lane->c);
  lane->st = DONE;
  metalemu_switch(&lane->sp, L->sched_sp);
  __builtin_trap();  // a finished lane is never resumed
}

extern "C" int metalemu_launch(metalemu_body body, void** buffers, const uint32_t* threadgroups,
                               const uint32_t* threads, uint32_t seed,
                               const uint64_t* tg_arg_bytes, int n_tg_args,
                               metalemu_report* rep) {
  Launch launch;
  L = &launch;
  launch.body = body;
  launch.buffers = buffers;
  launch.rep = rep;
  launch.rng.seed(seed * 2654435761u + 12345u);
  u3 tgs = {threadgroups[0], threadgroups[1], threadgroups[2]};
  u3 tpg = {threads[0], threads[1], threads[2]};
  unsigned n = tpg.x * tpg.y * tpg.z;
  if (n == 0 || n > 1024) {
    set_error(1, "threads per threadgroup must be 1..1024");
    return rep->error;
  }
  launch.tg_args.assign(tg_arg_bytes, tg_arg_bytes + n_tg_args);
  launch.arena = (unsigned char*)mmap(nullptr, kArena, PROT_NONE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  size_t per = kStack + kPage;  // a guard page below each stack
  char* stacks = (char*)mmap(nullptr, per * n, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  launch.lanes.resize(n);
  launch.simds.resize((n + 31) / 32);
  for (unsigned i = 0; i < n; i++) {
    mprotect(stacks + i * per, kPage, PROT_NONE);
    launch.lanes[i].stack_top = stacks + (i + 1) * per;
  }
  // Seed 0 is lockstep; other seeds pick how eagerly a simdgroup runs ahead.
  bool lockstep = seed == 0;
  static const double stays[4] = {1.0, 0.9, 0.5, 0.0};
  double stay = stays[seed % 4];
  for (uint32_t z = 0; z < tgs.z && !rep->error; z++)
    for (uint32_t y = 0; y < tgs.y && !rep->error; y++)
      for (uint32_t x = 0; x < tgs.x && !rep->error; x++) run_group({x, y, z}, tgs, tpg, lockstep, stay);
  munmap(stacks, per * n);
  munmap(launch.arena, kArena);
  L = nullptr;
  return rep->error;
}

// ---- faults --------------------------------------------------------------------------
static void on_fault(int sig, siginfo_t* info, void* uctx) {
  metalemu_report* rep = g_fault_report;
  rep->error = 2;
  rep->fault_addr = (uint64_t)info->si_addr;
#if defined(__x86_64__)
  rep->fault_write = (((ucontext_t*)uctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#endif
  if (L && L->cur) {
    const LaneCtx& c = L->cur->c;
    uint32_t t[3] = {c.thread_position_in_threadgroup.x, c.thread_position_in_threadgroup.y,
                     c.thread_position_in_threadgroup.z};
    uint32_t g[3] = {c.threadgroup_position_in_grid.x, c.threadgroup_position_in_grid.y,
                     c.threadgroup_position_in_grid.z};
    std::memcpy(rep->lane_tid, t, sizeof t);
    std::memcpy(rep->lane_tg, g, sizeof g);
    // Which threadgroup block (if any) was hit: name it for the message.
    for (auto& b : L->blocks) {
      uintptr_t a = (uintptr_t)info->si_addr, p = (uintptr_t)b.ptr;
      if (a >= p && a < p + b.size + kPage)
        snprintf(rep->msg, sizeof rep->msg, "threadgroup memory '%s' (%zu bytes): byte offset %ld",
                 b.name, b.size, (long)(a - p));
    }
  }
  const char* what = sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : sig == SIGFPE ? "SIGFPE" : "SIGILL";
  if (!rep->msg[0]) snprintf(rep->msg, sizeof rep->msg, "%s", what);
  _exit(86);
}

extern "C" void metalemu_install_fault_handler(metalemu_report* report) {
  g_fault_report = report;
  static char altstack[64 * 1024];
  stack_t ss = {};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa = {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) sigaction(s, &sa, nullptr);
}

// ---- launches described in a file ------------------------------------------------------
#include <fcntl.h>
#include <sys/stat.h>

extern "C" int metalemu_run_file(const char* path, metalemu_body body) {
  int fd = open(path, O_RDWR);
  if (fd < 0) return 3;
  struct stat st;
  fstat(fd, &st);
  unsigned char* base =
      (unsigned char*)mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) return 3;
  metalemu_file* f = (metalemu_file*)base;
  if (f->magic != METALEMU_MAGIC) return 3;
  for (uint32_t i = 0; i < f->n_guards && i < METALEMU_MAX_GUARDS; i++)
    mprotect(base + f->guard_offset[i], 4096, PROT_NONE);
  void* buffers[METALEMU_MAX_BUFFERS];
  for (int i = 0; i < METALEMU_MAX_BUFFERS; i++)
    buffers[i] = f->buffer_offset[i] ? base + f->buffer_offset[i] : nullptr;
  f->report.file_base = (uint64_t)base;
  for (uint32_t i = 0; i < f->n_constants && i < 32; i++) {
    g_constants[f->constants[i].index % 1024] = f->constants[i].value;
    g_constant_defined[f->constants[i].index % 1024] = true;
  }
  metalemu_install_fault_handler(&f->report);
  int rc = metalemu_launch(body, buffers, f->threadgroups, f->threads, f->seed, f->tg_bytes, 32,
                           &f->report);
  msync(base, st.st_size, MS_SYNC);
  return rc;
}
