#!/usr/bin/env python3
"""Checks the shape of src/: the module graph and the length of functions.

Prints which top-level module of src/ uses which (from `use crate::...` and
`crate::x::` paths, doc comments and `//` comments ignored), then the
functions longer than the limit. Exits 1 if the top-level modules form a
cycle or if a function (counted from its `fn` line to its closing brace,
both included) is longer than MAX_FN_LINES. Stdlib only; run by `make lint`.

    python3 scripts/modgraph.py            # graph per top-level module
    python3 scripts/modgraph.py --files    # graph per file
    python3 scripts/modgraph.py --check    # problems only (make lint)
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
MAX_FN_LINES = 80

CRATE_PATH = re.compile(r"\bcrate::(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
FN_LINE = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"[^\"]*\"\s+)?fn\s+([A-Za-z_][A-Za-z0-9_]*)")


def rust_files():
    for root, _dirs, files in os.walk(SRC):
        for name in sorted(files):
            if name.endswith(".rs"):
                yield os.path.relpath(os.path.join(root, name), SRC)


def top_module(rel):
    """src/worker/job.rs -> worker; src/config.rs -> config."""
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def file_module(rel):
    """src/worker/job.rs -> worker::job; src/worker/mod.rs -> worker."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts)


def code_lines(text):
    """The lines with `//` comments (doc comments included) cut off."""
    out = []
    for line in text.splitlines():
        cut = line.find("//")
        # a `//` inside a string literal ("http://") is kept: crude but
        # sufficient, a crate path never follows one on the same line
        if cut >= 0 and line[:cut].count('"') % 2 == 0:
            line = line[:cut]
        out.append(line)
    return out


def uses(lines):
    """Top-level modules named by crate:: paths in these lines."""
    found = set()
    joined = "\n".join(lines)
    for m in CRATE_PATH.finditer(joined):
        target = m.group(1)
        if target.startswith("{"):
            for item in target[1:-1].split(","):
                item = item.strip().split("::")[0].strip()
                if item and item != "self":
                    found.add(item)
        else:
            found.add(target)
    return found


def graph(per_file):
    edges = {}
    for rel in rust_files():
        with open(os.path.join(SRC, rel), encoding="utf-8") as f:
            lines = code_lines(f.read())
        node = file_module(rel) if per_file else top_module(rel)
        deps = {d for d in uses(lines) if d != top_module(rel)}
        edges.setdefault(node, set()).update(deps)
    return edges


def find_cycle(edges):
    """One cycle among the nodes as a list, or None."""
    white, grey, black = 0, 1, 2
    colour = {n: white for n in edges}
    stack = []

    def visit(n):
        colour[n] = grey
        stack.append(n)
        for d in sorted(edges.get(n, ())):
            if colour.get(d, black) == grey:
                return stack[stack.index(d):] + [d]
            if colour.get(d, black) == white:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        colour[n] = black
        return None

    for n in sorted(edges):
        if colour[n] == white:
            found = visit(n)
            if found:
                return found
    return None


def long_functions():
    """(file, line, name, length) for each fn longer than MAX_FN_LINES."""
    out = []
    for rel in rust_files():
        with open(os.path.join(SRC, rel), encoding="utf-8") as f:
            lines = code_lines(f.read())
        for i, line in enumerate(lines):
            m = FN_LINE.match(line)
            if not m:
                continue
            end = body_end(lines, i)
            if end is None:
                continue
            length = end - i + 1
            if length > MAX_FN_LINES:
                out.append((os.path.join("src", rel), i + 1, m.group(7), length))
    return out


def body_end(lines, start):
    """Index of the line closing the fn starting at `start` (None if bodiless)."""
    depth = 0
    opened = False
    for j in range(start, len(lines)):
        for ch in strip_literals(lines[j]):
            if ch == "{":
                depth += 1
                opened = True
            elif ch == "}":
                depth -= 1
                if opened and depth == 0:
                    return j
            elif ch == ";" and not opened and depth == 0:
                return None  # a declaration in a trait
    return None


def strip_literals(line):
    """The line without string and char literals (their braces don't count)."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    return re.sub(r"'(\\.|[^'\\])'", "''", line)


def main():
    per_file = "--files" in sys.argv[1:]
    quiet = "--check" in sys.argv[1:]
    edges = graph(per_file)
    for node in sorted(edges) if not quiet else ():
        print(f"{node} -> {', '.join(sorted(edges[node])) or '-'}")
    failed = False
    top = graph(False)
    # lib.rs and main.rs declare the modules; they are the roots, not floors
    for root in ("lib", "main"):
        top.pop(root, None)
    cycle = find_cycle(top)
    if cycle:
        print("cycle among top-level modules: " + " -> ".join(cycle))
        failed = True
    elif not quiet:
        print("no cycle among top-level modules")
    for path, line, name, length in long_functions():
        print(f"{path}:{line}: fn {name} is {length} lines (max {MAX_FN_LINES})")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
