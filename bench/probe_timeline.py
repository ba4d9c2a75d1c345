"""Where a layer's wall-clock time goes on the GPU (a diagnostic, not a benchmark row).

    python bench/probe_timeline.py [case ...] [--per-eval K]
For each case of probe_cases() (default: "base fwd+bwd" and "lora fwd+bwd"), K calls are
evaluated together (as the paired rows' x8) a few times under torch.profiler, and the last
evaluation is printed as a timeline: the host's CUDA API calls (graph launch, sync) and
every kernel with its start and end in microseconds from the evaluation's start, the
kernels' concurrency, the GPU's idle time inside the span, and each kernel's count, sum,
minimum (alone) and median. What it answers: whether
the time outside the kernels is host work before the graph launches, gaps between nodes,
or kernels sharing the SMs (a persistent GEMM beside a memory-bound kernel).
"""
import sys
import time

import mlx.core as mx

from common import probe_cases


def timeline(fn, per_eval: int, reps: int = 4):
    import torch
    from torch.profiler import ProfilerActivity, profile

    def one():
        mx.eval([fn() for _ in range(per_eval)])

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    marks = []
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            t0 = time.perf_counter()
            one()
            marks.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.time_range.end > e.time_range.start]
    # The GPU's kernels and the host's calls, each in start order (report() picks the last
    # evaluation out of them).
    kern = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    api = sorted((e for e in events if e.device_type.name != "CUDA"), key=lambda e: e.time_range.start)
    return kern, api, marks


def report(name, per_eval):
    fn = probe_cases()[name]
    kern, api, marks = timeline(fn, per_eval)
    # Evaluations are separated by a synchronization: split kernels where the GPU sat idle
    # for longer than any in-graph gap could be (> 50 us) and keep the last group.
    groups, cur = [], [kern[0]]
    for e in kern[1:]:
        if e.time_range.start - max(k.time_range.end for k in cur) > 50:
            groups.append(cur)
            cur = []
        cur.append(e)
    groups.append(cur)
    last = groups[-1]
    t0 = last[0].time_range.start
    span = max(e.time_range.end for e in last) - t0
    busy, covered, end = 0.0, 0.0, t0
    for e in last:  # the union of the kernels' intervals (covered) and their sum (busy)
        s, f = e.time_range.start, e.time_range.end
        busy += f - s
        if f > end:
            covered += f - max(s, end)
            end = f
    # Host calls between the previous group's end and this group's end.
    prev_end = max(e.time_range.end for e in groups[-2]) if len(groups) > 1 else t0 - 1e9
    host = [e for e in api if prev_end <= e.time_range.start <= t0 + span]
    wall = marks[-1] * 1e6
    print(f"== {name}, {per_eval} per evaluation: wall {wall:.1f} us ({wall / per_eval:.1f} a call); "
          f"GPU span {span:.1f} us, kernels {busy:.1f} us summed, {covered:.1f} us covered "
          f"(idle in the span {span - covered:.1f} us; overlap {busy - covered:.1f} us); "
          f"{len(last)} kernels")
    per = {}
    for e in host:  # the host's CUDA API calls of this evaluation, by name
        n, us = per.get(e.name, (0, 0.0))
        per[e.name] = (n + 1, us + e.time_range.end - e.time_range.start)
    print("   host API calls (calls, us): " + ", ".join(
        f"{k} {n} {us:.1f}" for k, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])))
    for e in host:
        if e.time_range.end - e.time_range.start >= 5:
            print(f"   host {e.time_range.start - t0:9.1f} .. {e.time_range.end - t0:9.1f}  "
                  f"{e.time_range.end - e.time_range.start:8.1f} us  {e.name[:60]}")
    for e in last[: 12 * 8 + 12]:
        print(f"   gpu  {e.time_range.start - t0:9.1f} .. {e.time_range.end - t0:9.1f}  "
              f"{e.time_range.end - e.time_range.start:8.1f} us  {e.name[:70]}")
    # The kernels by name: the minimum is a kernel that ran alone (or nearly); sums and
    # medians include the time shared with concurrent kernels.
    times = {}
    for e in last:
        times.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    for n, ts in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        ts.sort()
        print(f"   kernel x{len(ts):<3d} sum {sum(ts):8.1f}  min {ts[0]:7.1f}  median "
              f"{ts[len(ts) // 2]:7.1f} us  {n[:70]}")


if __name__ == "__main__":
    args = sys.argv[1:]
    k = 8
    if "--per-eval" in args:
        i = args.index("--per-eval")
        k = int(args[i + 1])
        del args[i : i + 2]
    for name in args or ["base fwd+bwd", "lora fwd+bwd"]:
        report(name, k)
