// runner <kernel library .so> <kernel index> <launch file>: runs one launch in its own
// process, so that a fault in a kernel becomes a report instead of killing pytest.
#include <dlfcn.h>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  if (argc != 4) return 3;
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "runner: %s\n", dlerror());
    return 3;
  }
  auto run = (int (*)(const char*, int))dlsym(lib, "metalemu_main");
  if (!run) return 3;
  return run(argv[3], atoi(argv[2])) ? 1 : 0;
}
