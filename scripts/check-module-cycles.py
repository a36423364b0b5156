#!/usr/bin/env python3
"""Fails when keygate's modules import each other in a ring.

Reads every `crate::…`, `super::…` and `self::…` path in src/, and builds two kinds of graph:
the crate's top-level modules (an edge a -> b when any file under `a` names `crate::b`), and,
inside each module with children, those children (an edge when one names a sibling through
`super::`, `self::` or its `crate::` path). A cycle in any of them is printed and the exit status
is 1. Comments and unit-test modules are ignored; the crate root (lib.rs, main.rs) is not a
node.

    scripts/check-module-cycles.py          # check
    scripts/check-module-cycles.py --graph  # also print the top-level edges
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super|self)::\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def module_of(path: Path) -> list[str]:
    """`src/a/b.rs` -> ["a", "b"]; `src/a/mod.rs` -> ["a"]; `src/lib.rs` -> []."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return parts


def strip_comments(text: str) -> str:
    """The file's code without comments and without its unit tests (`#[cfg(test)] mod tests`,
    at the end of a file by this crate's convention): a test's helper is no dependency."""
    tests = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests\b", text)
    if tests:
        text = text[: tests.start()]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def references(text: str, here: list[str]) -> set[tuple[str, ...]]:
    """Absolute module paths (as tuples) named in `text`, a file of module `here`."""
    found = set()

    def add(anchor: str, rest: list[str]) -> None:
        if anchor == "crate":
            base = []
        elif anchor == "super":
            base = here[:-1]
        else:
            base = list(here)
        while rest and rest[0] == "super":
            base = base[:-1]
            rest = rest[1:]
        found.add(tuple(base + rest))

    for anchor, group in GROUP.findall(text):
        for item in re.split(r",(?![^{]*\})", group):
            names = [n for n in re.split(r"::|\{|\}|\s", item) if n and n != "self"]
            if names:
                add(anchor, names[:1])
    for anchor, rest in PATH.findall(text):
        add(anchor, rest.strip(":").split("::"))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's nodes, found by depth-first search (small graphs)."""
    found, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        found.append(path + [start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return found


def main() -> int:
    files = sorted(ROOT.rglob("*.rs"))
    modules = {tuple(module_of(f)) for f in files}
    graphs: dict[tuple[str, ...], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for f in files:
        here = module_of(f)
        if not here:
            continue
        for target in references(strip_comments(f.read_text()), here):
            # The longest known module that `target` starts with.
            while target and target not in modules:
                target = target[:-1]
            if not target:
                continue
            # Compare at each level where the two paths share a parent and then differ.
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common < len(here) and common < len(target):
                parent = tuple(here[:common])
                graphs[parent][here[common]].add(target[common])
    failed = False
    for parent in sorted(graphs):
        name = "::".join(parent) or "crate"
        for cycle in cycles(graphs[parent]):
            failed = True
            print(f"module cycle in {name}: {' -> '.join(cycle)}")
    if "--graph" in sys.argv:
        for module, targets in sorted(graphs[()].items()):
            print(f"{module} -> {', '.join(sorted(targets))}")
    if not failed:
        count = sum(len(t) for g in graphs.values() for t in g.values())
        print(f"no module cycles ({len(modules)} modules, {count} edges)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
