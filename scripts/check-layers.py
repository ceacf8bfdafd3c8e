#!/usr/bin/env python3
"""The layer rule of docs/architecture.md, checked over gateway/src.

Every module has a layer (LAYERS below: the longest module-path prefix that
is listed decides). A file may use what is in its own layer or below, never
above; and no set of files may use each other in a circle. References are
read from the code as text: `crate::a::b` paths (in `use` lines and inline)
and `super::`/`self::` paths, comments left out. Test code (`tests.rs` and `tests/`
files, and `#[cfg(test)] mod tests` at a file's end) may use any layer.

Before it looks at the crate it checks itself on a small made-up one (a
use of a layer above, a circle of `super::` uses), so it cannot pass by
seeing nothing. Exit status 1 with every violation listed; 0 with a
one-line summary.
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "gateway" / "src"

# Module path prefix -> layer. Keep in step with docs/architecture.md.
LAYERS = {
    # L0: leaf types and process-wide state; TLS material and primitives.
    "types": 0,
    "http1": 0,
    "lifecycle": 0,
    "deadline": 0,
    "telemetry::names": 0,
    "telemetry::metrics": 0,
    "telemetry::process_log": 0,
    "tls": 0,
    # L1: the config: raw -> validate -> model (plain data), material beside it.
    "config": 1,
    # L2: the domain, pure or nearly: decisions over the model.
    "router": 2,
    "authz": 2,
    "ratelimit": 2,
    "egress": 2,
    "endpoints": 2,
    "resilience": 2,
    "telemetry": 2,
    # L3: the runtime: what is compiled and loaded from a config.
    "runtime": 3,
    # L4: the data plane: request stages, and the connection drivers.
    "proxy": 4,
    "downstream": 4,
    "lane": 4,
    # L5: the process.
    "server": 5,
    "reload": 5,
    "listening": 5,
    "upgrade": 5,
    "admin": 5,
    "admin_client": 5,
    "shutdown": 5,
    "notify": 5,
    "demo": 5,
    "background": 5,
    "lib": 5,
}
NAMES = ["L0 leaf", "L1 config", "L2 domain", "L3 runtime", "L4 data plane", "L5 process"]


def module_of(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return "::".join(parts) or "lib"


def layer_of(module: str) -> int:
    parts = module.split("::")
    for n in range(len(parts), 0, -1):
        layer = LAYERS.get("::".join(parts[:n]))
        if layer is not None:
            return layer
    sys.exit(f"check-layers: no layer for module `{module}`: add it to LAYERS")


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def check(src: Path) -> list:
    """Every breach of the rule in the crate at `src`, and the summary line."""
    files = {
        module_of(p, src): p
        for p in src.rglob("*.rs")
        if p.name != "tests.rs" and "tests" not in p.relative_to(src).parts[:-1]
    }
    # `main.rs` is the binary: it uses the library as `meshgate::`.
    files.pop("main", None)
    known = set(files)

    def target(path: list) -> str | None:
        """The module a path names: its longest prefix that is a file."""
        for n in range(len(path), 0, -1):
            m = "::".join(path[:n])
            if m in known:
                return m
        return None

    edges = {m: set() for m in files}
    for module, path in files.items():
        text = strip_comments(path.read_text())
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests\b", text)[0]
        here = module.split("::") if module != "lib" else []
        refs = []
        for m in re.finditer(r"\b(crate|super|self)((?:::\w+)+)(::\{([^}]*)\})?", text):
            root, rest, group = m.group(1), m.group(2), m.group(4)
            segs = [s for s in rest.split("::") if s]
            if root == "crate":
                base = []
            elif root == "super":
                # `super` is the module above this one, whether this one
                # is a `mod.rs` or a plain file.
                base = here[:-1]
                while segs and segs[0] == "super":
                    segs.pop(0)
                    base = base[:-1]
            else:
                base = list(here)
            refs.append(base + segs)
            for item in (group or "").split(","):
                item = item.strip().split(" ")[0]
                if re.fullmatch(r"\w+(::\w+)*", item or "-"):
                    refs.append(base + segs + item.split("::"))
        for ref in refs:
            t = target(ref)
            if t and t != module:
                edges[module].add(t)

    problems = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if lb > la:
                problems.append(f"{files[a].relative_to(src.parent.parent)}: `{a}` ({NAMES[la]}) uses `{b}` ({NAMES[lb]}), a layer above it")

    # Circles: strongly connected components of more than one file.
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            connect(v)
    for comp in sccs:
        ties = [f"{a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
        problems.append(f"a circle of {len(comp)} modules: {', '.join(comp)} ({'; '.join(ties)})")

    n = sum(len(t) for t in edges.values())
    return problems, f"{len(files)} modules, {n} uses, every one down or across a layer, no circle"


def self_test() -> None:
    """The check finds what it is for: a use of a layer above, and a circle
    made of `super::` uses between plain files."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "gateway" / "src"
        for name, text in {
            "lib.rs": "pub mod proxy;\npub mod router;\n",
            "router/mod.rs": "use crate::proxy::ctx::RequestCtx;\n",
            "proxy/mod.rs": "mod ctx;\nmod egress;\n",
            "proxy/ctx.rs": "pub struct RequestCtx(super::egress::Target);\n",
            "proxy/egress.rs": "use super::ctx::RequestCtx;\npub struct Target;\n",
        }.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        problems, _ = check(src)
    above = [p for p in problems if "a layer above it" in p]
    circles = [p for p in problems if p.startswith("a circle of 2 modules: proxy::ctx, proxy::egress")]
    if len(above) != 1 or len(circles) != 1:
        sys.exit(f"check-layers: the self-test found {problems}")


def main() -> int:
    self_test()
    problems, summary = check(SRC)
    if problems:
        print("check-layers: the layer rule is broken (docs/architecture.md):")
        for p in problems:
            print("  " + p)
        return 1
    print(f"check-layers: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
