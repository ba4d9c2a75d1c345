"""Turns a .metal file into a shared library the emulator can launch.

Pipeline: `clang -E` with the emulator's <metal_stdlib> (MSL keywords become marker
identifiers), source rewrites of what C++ cannot say (below), a generated launcher per
[[host_name]] instantiation, then `clang -O1 -shared` with the runtime. Everything is
cached under METALEMU_CACHE (default ~/.cache/mlx-tuner-metal-emu), keyed by content.

Rewrites, each because clang C++ has no equivalent:
- `template [[host_name("n")]] [[kernel]] decltype(f<T>) f<T>;` -> a plain explicit
  instantiation, recorded as kernel `n`;
- `threadgroup T x[N];` in a kernel body -> a reference into the runtime's per-threadgroup
  memory (shared by the threadgroup's lanes, poisoned, guarded);
- member functions qualified `device`/`constant`/`threadgroup` (MLX's complex.h overloads
  on the object's address space) -> `requires(false)`: only the `thread` overload stays;
- `float4(a, b)` / `vec<T, 2>(x)` / `static_cast<float4>(h)` -> metalemu::make<...>(...).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
RUNTIME = HERE / "runtime"
CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-fno-strict-aliasing", "-fno-sanitize=all", "-w"]


class MetalCompileError(RuntimeError):
    """The .metal source does not compile (the message holds clang's diagnostics)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("METALEMU_CACHE") or Path.home() / ".cache" / "mlx-tuner-metal-emu")
    d.mkdir(parents=True, exist_ok=True)
    return d


def compiler() -> list[str]:
    """METALEMU_CXX if set, else the clang in the `ziglang` package (the `test` extra)."""
    if os.environ.get("METALEMU_CXX"):
        return shlex.split(os.environ["METALEMU_CXX"])
    try:
        import ziglang  # noqa: F401
    except ImportError as e:
        raise MetalCompileError(
            "the Metal emulator needs clang >= 17: `pip install ziglang` (in the `test` extra) "
            "or set METALEMU_CXX"
        ) from e
    return [sys.executable, "-m", "ziglang", "c++"]


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise MetalCompileError(f"{what} failed:\n{r.stderr[-12000:]}")
    return r


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _emulator_hash() -> str:
    h = hashlib.sha256(" ".join(compiler() + CXX_FLAGS).encode())
    for f in sorted([*RUNTIME.glob("*"), *INCLUDE.rglob("*"), Path(__file__)]):
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _build_runtime(key: str) -> tuple[Path, Path]:
    """runtime.o (linked into every kernel library) and the runner executable."""
    d = cache_dir()
    obj, runner = d / f"runtime-{key}.o", d / f"runner-{key}"
    if not obj.exists():
        tmp = d / f".runtime-{key}.{os.getpid()}.o"
        _run([*compiler(), *CXX_FLAGS, f"-I{INCLUDE}", "-c", str(RUNTIME / "runtime.cpp"),
              "-o", str(tmp)], "compiling the emulator runtime")
        os.replace(tmp, obj)
    if not runner.exists():
        tmp = d / f".runner-{key}.{os.getpid()}"
        _run([*compiler(), *CXX_FLAGS, str(RUNTIME / "runner.cpp"), "-o", str(tmp), "-ldl"],
             "compiling the emulator runner")
        os.replace(tmp, runner)
    return obj, runner


# ---- parsing the preprocessed source --------------------------------------------------
_ATTRS = {  # MSL builtin attribute -> LaneCtx field
    "thread_position_in_grid": "thread_position_in_grid",
    "thread_position_in_threadgroup": "thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "threadgroup_position_in_grid",
    "threads_per_threadgroup": "threads_per_threadgroup",
    "dispatch_threads_per_threadgroup": "threads_per_threadgroup",
    "threads_per_grid": "threads_per_grid",
    "grid_size": "threads_per_grid",
    "threadgroups_per_grid": "threadgroups_per_grid",
    "thread_index_in_threadgroup": "thread_index_in_threadgroup",
    "thread_index_in_simdgroup": "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup": "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup": "simdgroups_per_threadgroup",
    "threads_per_simdgroup": "threads_per_simdgroup",
    "thread_execution_width": "threads_per_simdgroup",
    "quadgroup_index_in_threadgroup": "thread_index_in_threadgroup / 4",
    "thread_index_in_quadgroup": "thread_index_in_threadgroup % 4",
    "quadgroups_per_threadgroup": "(threads_per_threadgroup.x * threads_per_threadgroup.y * threads_per_threadgroup.z + 3) / 4",
}
_FIELDS = {v for v in _ATTRS.values() if v.isidentifier()}
_VEC = r"(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool)[234]"


@dataclass
class Param:
    decl: str
    kind: str  # "buffer" | "threadgroup" | "attr"
    index: int = -1  # [[buffer(i)]] / [[threadgroup(i)]]
    attr: str = ""
    is_ref: bool = False
    address_space: str = ""  # device | constant | threadgroup | ""


@dataclass
class Kernel:
    host_name: str
    call: str  # C++ id of the instantiation, e.g. `my_kernel<float, 4>`
    params: list[Param] = field(default_factory=list)


def _match(s: str, i: int, open_: str = "(", close: str = ")") -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_:
            depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0:
                return j
    raise MetalCompileError(f"unbalanced {open_}{close} near: {s[i:i + 80]!r}")


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return [x.strip() for x in out]


def _parse_params(name: str, text: str) -> list[Param]:
    params, next_buffer = [], 0
    for p in _split_top(text):
        m = re.search(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]", p)
        decl = re.sub(r"\[\[.*?\]\]", "", p).strip()
        attr, idx = (m.group(1), m.group(2)) if m else ("buffer", None)
        asp = re.search(r"__msl_(device|constant|threadgroup)", decl)
        param = Param(decl=decl, kind="attr", is_ref="&" in decl,
                      address_space=asp.group(1) if asp else "")
        if attr == "buffer":
            param.kind, param.index = "buffer", int(idx) if idx is not None else next_buffer
            next_buffer = param.index + 1
        elif attr == "threadgroup":
            param.kind, param.index = "threadgroup", int(idx or 0)
        elif attr in _ATTRS:
            param.attr = _ATTRS[attr]
        else:  # reported if this kernel is instantiated
            param.kind, param.attr = "unknown", attr
        params.append(param)
    return params


def _tg_decl(m: re.Match) -> str:
    """`threadgroup T name[N];` -> a reference into runtime-owned threadgroup memory."""
    ty, name, dims = m.group(1).strip(), m.group(2), m.group(3) or ""
    key = f"__metalemu_tg_{name}"
    full = f"__msl_threadgroup {ty} (&{name}){dims}"
    cast = f"(__msl_threadgroup {ty} (*){dims})" if dims else f"(__msl_threadgroup {ty} *)"
    nl = "\n" * m.group(0).count("\n")  # keep line numbers
    return (f"static char {key}; {full} = *{cast}::metalemu::tg_alloc(&{key}, sizeof({ty}{dims}), "
            f"alignof({ty}), \"{name}\");{nl}")


def _vec_ctor(m: re.Match) -> str:
    before = m.string[max(0, m.start() - 12):m.start()]
    if re.search(r"operator\s*$", before):
        return m.group(0)
    return f"::metalemu::make<{m.group(1)}>("


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _drop_address_space_methods(text: str) -> str:
    """Deletes member functions qualified `device`/`constant`/`threadgroup` (C++ cannot
    overload on the object's address space); the unqualified (`thread`) one stays."""
    pat = re.compile(r"\)(\s*(?:const\s*)?)__msl_(?:device|constant|threadgroup)\b(?=\s*[{:;=])")
    while m := pat.search(text):
        # Start: after the previous member (`;`, `}`, `{` or an access specifier).
        depth, j = 0, m.start()
        while j > 0:
            c = text[j]
            if c == ")":
                depth += 1
            elif c == "(":
                depth -= 1
            elif depth == 0 and c in ";{}":
                break
            j -= 1
        acc = list(re.finditer(r"\b(?:public|private|protected)\s*:(?!:)", text[j:m.start()]))
        start = j + 1 + (acc[-1].end() - 1 if acc else 0)
        # End: the body, after any constructor initialisers.
        i = _skip_ws(text, m.end())
        if text[i] == ":":
            i += 1
            while True:
                i = _skip_ws(text, i)
                while i < len(text) and (text[i].isalnum() or text[i] in "_:<>, "):
                    if text[i] == "," and text[i - 1] != ">":
                        break
                    i += 1
                close = ")" if text[i] == "(" else "}"
                i = _skip_ws(text, _match(text, i, text[i], close) + 1)
                if text[i] != ",":
                    break
                i += 1
        if text[i] == "{":
            end = _match(text, i, "{", "}") + 1
        else:
            end = text.index(";", i) + 1
        text = text[:start] + "\n" * text.count("\n", start, end) + text[end:]
    return text


def _rewrite_user(text: str) -> str:
    text = re.sub(
        r"\b__msl_threadgroup\s+((?:const\s+)?(?:typename\s+)?[\w:]+(?:\s*<[^;{}]*?>)?)\s+(\w+)\s*"
        r"((?:\[[^\];]+\]\s*)*);", _tg_decl, text)
    text = _drop_address_space_methods(text)
    # `constant T x[N]` parameters: an address-space array parameter is a pointer.
    text = re.sub(r"(__msl_(?:device|constant|threadgroup)\s+(?:const\s+)?[\w:]+(?:\s+const)?)\s+(\w+)\s*"
                  r"\[\s*\w*\s*\](?=\s*[,)])", r"\1* \2", text)
    # half literals: 1.5h
    text = re.sub(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)h\b", r"((half)\1f)", text)
    text = re.sub(rf"\bstatic_cast\s*<\s*({_VEC})\s*>\s*\(", r"::metalemu::make<\1>(", text)
    text = re.sub(rf"(?<![\w.:>])({_VEC})\s*\(", _vec_ctor, text)
    text = re.sub(r"(?<![\w.])((?:metal::)?vec\s*<[^<>;(){}]*>)\s*\(", _vec_ctor, text)
    return text


def rewrite(pp: str, source: Path) -> tuple[str, list[Kernel]]:
    """Rewrites the user regions of preprocessed text; returns it and the kernels."""
    shim = str(INCLUDE)
    chunks, cur, user = [], [], True
    for line in pp.split("\n"):
        lm = re.match(r'# \d+ "([^"]*)"', line)
        if lm:
            chunks.append((user, "\n".join(cur)))
            cur = []
            f = lm.group(1)
            user = not (f.startswith(shim) or f.startswith("/usr/") or f.startswith("<")
                        or "/ziglang/" in f or "/libcxx" in f)
            chunks.append((False, line))
            continue
        cur.append(line)
    chunks.append((user, "\n".join(cur)))
    text = "\n".join(_rewrite_user(c) if u else c for u, c in chunks)
    text = re.sub(r"\[\[\s*__msl_threadgroup\s*\(", "[[threadgroup(", text)  # [[threadgroup(i)]]

    # Explicit instantiations with [[host_name]]: clang rejects attributes there.
    kernels, inst = [], []

    def host(m: re.Match) -> str:
        name = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        start = m.end() - 1
        end = _match(text, start)
        inst.append((name, text[start + 1:end].strip()))
        return "template decltype("

    text = re.sub(r'\btemplate\s*\[\[\s*host_name\s*\(\s*((?:"[^"]*"\s*)+)\)\s*\]\]\s*'
                  r'(?:\[\[\s*__msl_kernel\s*\]\]|__msl_kernel)\s*decltype\s*\(', host, text)
    defs: dict[str, tuple[list[Param], bool]] = {}
    for m in re.finditer(r"(?:\[\[\s*__msl_kernel\s*\]\]|\b__msl_kernel\b)\s*void\s+(\w+)\s*\(", text):
        name = m.group(1)
        end = _match(text, m.end() - 1)
        is_template = text[:m.start()].rstrip().endswith(">")
        if name not in defs:
            defs[name] = (_parse_params(name, text[m.end():end]), is_template)
    for name, call in inst:
        base = re.match(r"\s*([\w:]+)", call).group(1).split("::")[-1]
        if base not in defs:
            raise MetalCompileError(f"{source}: [[host_name(\"{name}\")]] instantiates unknown kernel {base}")
        kernels.append(Kernel(name, call, defs[base][0]))
    for name, (params, is_template) in defs.items():
        if not is_template:
            kernels.append(Kernel(name, name, params))
    text = re.sub(r"\[\[\s*__msl_kernel\s*\]\]|\b__msl_kernel\b", "", text)
    return _function_constants(text), kernels


def _function_constants(text: str) -> str:
    """`constant T x [[function_constant(i)]];` -> a reference to the runtime's slot i, set
    per launch (Library.run(function_constants={i: value}))."""
    index = {}

    def decl(m: re.Match) -> str:
        ty, name, i = m.group(1).strip(), m.group(2), m.group(3)
        index[name] = i
        return (f"static const {ty}& {name} = *(const {ty}*)::metalemu::function_constant({i}, "
                f"sizeof({ty}));")

    text = re.sub(r"\b__msl_constant\s+([\w:]+)\s+(\w+)\s*\[\[\s*function_constant\s*\(\s*(\d+)\s*\)"
                  r"\s*\]\]\s*;", decl, text)
    return re.sub(r"\bis_function_constant_defined\s*\(\s*(\w+)\s*\)",
                  lambda m: f"::metalemu::function_constant_defined({index.get(m.group(1), 1023)})", text)


def _launcher(kernels: list[Kernel]) -> str:
    out = ["\n// ---- generated by tests/metal/_build.py ----", "namespace metalemu {",
           "struct BufPtr { void* p; template <class T> operator T*() const { return (T*)p; } };",
           "struct BufRef { void* p; template <class T> operator T&() const { return *(T*)p; } };",
           "struct Attr { u3 v; template <class T> operator T() const {",
           "  if constexpr (metal::is_vector_v<T>) { using E = typename metal::vec_traits<T>::elem;",
           "    T r{}; r[0] = E(v.x); r[1] = E(v.y);",
           "    if constexpr (metal::vec_traits<T>::n > 2) r[2] = E(v.z); return r;",
           "  } else { return T(v.x); } } };",
           "inline Attr attr(u3 v) { return {v}; }",
           "inline Attr attr(uint32_t x) { return {{x, 0, 0}}; }",
           "template <class A> constexpr long long arg_size() {",
           "  using B = std::remove_reference_t<A>;",
           "  if constexpr (std::is_pointer_v<B>) { using P = std::remove_pointer_t<B>;",
           "    if constexpr (std::is_void_v<std::remove_cv_t<P>>) return 0; else return sizeof(P); }",
           "  else return sizeof(B); }",
           "template <class F> struct ArgSizes;",
           "template <class R, class... A> struct ArgSizes<R(A...)> {",
           "  static constexpr long long v[] = {arg_size<A>()..., 0}; };",
           "}  // namespace metalemu"]
    bodies = []
    for i, k in enumerate(kernels):
        args = []
        for p in k.params:
            if p.kind == "buffer":
                args.append(f"::metalemu::{'BufRef' if p.is_ref else 'BufPtr'}{{b[{p.index}]}}")
            elif p.kind == "threadgroup":
                args.append(f"::metalemu::BufPtr{{::metalemu::tg_arg({p.index})}}")
            elif p.kind == "unknown":
                raise MetalCompileError(f"kernel {k.host_name}: the emulator does not know "
                                        f"[[{p.attr}]] ({p.decl})")
            else:
                expr = re.sub(r"\b([a-z_]+)\b", lambda m: "c->" + m.group(1)
                              if m.group(1) in _FIELDS else m.group(1), p.attr)
                args.append(f"::metalemu::attr({expr})")
        out.append(f"static void metalemu_body_{i}(void** b, const ::metalemu::LaneCtx* c) {{\n"
                   f"  (void)b; (void)c; {k.call}({', '.join(args)});\n}}")
        out.append(f"extern \"C\" const long long* metalemu_arg_sizes_{i}() {{\n"
                   f"  return ::metalemu::ArgSizes<decltype({k.call})>::v;\n}}")
        bodies.append(f"metalemu_body_{i}")
    out.append("extern \"C\" int metalemu_run_file(const char* path, metalemu_body body);")
    out.append("extern \"C\" int metalemu_main(const char* path, int k) {\n"
               f"  static const metalemu_body bodies[] = {{{', '.join(bodies) or 'nullptr'}}};\n"
               "  return metalemu_run_file(path, bodies[k]);\n}")
    return "\n".join(out) + "\n"


@dataclass
class Built:
    so: Path
    runner: Path
    kernels: list[Kernel]


def build(path: Path, include_dirs: tuple[str, ...] = (), defines: tuple[str, ...] = ()) -> Built:
    """Compiles `path` (cached); raises MetalCompileError with clang's diagnostics."""
    key = _emulator_hash()
    runtime_o, runner = _build_runtime(key)
    incs = [f"-I{INCLUDE}", f"-I{path.parent}"] + [f"-I{d}" for d in include_dirs]
    pp = _run([*compiler(), "-E", "-x", "c++", "-std=c++20", "-DMETALEMU_PP", *incs,
               *[f"-D{d}" for d in defines], str(path)],
              f"preprocessing {path}").stdout
    h = hashlib.sha256((key + str(path) + pp).encode()).hexdigest()[:20]
    d = cache_dir()
    so, meta = d / f"{path.stem}-{h}.so", d / f"{path.stem}-{h}.kernels"
    text, kernels = rewrite(pp, path)
    if not so.exists():
        cpp = d / f"{path.stem}-{h}.cpp"
        prelude = ("#define __msl_device __attribute__((address_space(1)))\n"
                   "#define __msl_constant __attribute__((address_space(2)))\n"
                   "#define __msl_threadgroup __attribute__((address_space(3)))\n")
        _write_atomic(cpp, prelude + text + _launcher(kernels))
        tmp = d / f".{so.name}.{os.getpid()}"
        _run([*compiler(), *CXX_FLAGS, "-shared", "-x", "c++", str(cpp), "-x", "none",
              str(runtime_o), "-o", str(tmp)], f"compiling {path}")
        os.replace(tmp, so)
        _write_atomic(meta, "\n".join(k.host_name for k in kernels))
    return Built(so, runner, kernels)
