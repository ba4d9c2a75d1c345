"""Per-kernel totals of a probe_timeline.py output: count, sum, min and median of each kernel's time."""
import re,sys,collections
d=collections.defaultdict(list)
for l in open(sys.argv[1]):
    m=re.match(r'\s+gpu\s+([\d.]+) \.\.\s+([\d.]+)\s+([\d.]+) us\s+(.*)',l)
    if m: d[re.sub(r'void |mlx_tuner::|\(anonymous namespace\)::|cuda::|lora_gemm::','',m.group(4))[:44]].append(float(m.group(3)))
for k,v in sorted(d.items(), key=lambda x:-sum(x[1])): print(f"  {len(v):3d} sum {sum(v):7.0f} min {min(v):6.1f} med {sorted(v)[len(v)//2]:6.1f} {k}")
