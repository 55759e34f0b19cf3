#!/usr/bin/env python3
"""The workspace's layering rules (issue 15; stated in ARCHITECTURE.md), checked on the source.

Usage: python3 .ci/check-layers.py [ROOT]   (ROOT defaults to the repository holding this script)
  LAYERS_SKIP_CARGO=1  crate-deps reads the members' Cargo.toml [dependencies] instead of running
                       `cargo tree` (no cargo, no network: the script's own test uses this)
  LAYERS_STRICT=1      a pure core listed below that does not exist fails instead of warning

Each violation prints as `path:line: rule: source line`; the exit status is 1 if there is any.

"Mentions" are found in code only: comments and string contents are blanked first, every `use`
tree is expanded to full paths (`use crate::{drift, serve::Shared}` names `crate::serve::Shared`)
and `self::`/`super::`/child-module paths are resolved to `crate::` ones, so
`use super::super::store::Db` in rollout/engine.rs is `crate::store::Db`.
"""

import functools
import os
import re
import subprocess
import sys
import tomllib
from collections import defaultdict, deque

sys.dont_write_bytecode = True  # no __pycache__ left in .ci/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rustsrc  # noqa: E402

# ---- The rules -------------------------------------------------------------------------------

# Pure cores: decision logic as plain functions of (state, inputs, now) -> decisions, so every
# transition is unit-tested without sleeping, and the fleet simulator can drive the agent's own
# machine. `a|b` = one core that may be a file, a directory (trailing `/`) or both; a core none of
# whose paths exists yet is a warning (LAYERS_STRICT=1: a failure).
PURE_CORES = [
    "control-plane/src/rollout/engine.rs|control-plane/src/rollout/engine/",
    "control-plane/src/rollout/gates.rs",
    "control-plane/src/rollout/waves.rs",
    "control-plane/src/rollout/slots.rs",
    "control-plane/src/rollout/plan.rs",
    "control-plane/src/rollout/windows.rs",
    "control-plane/src/drift.rs|control-plane/src/drift/",
    "control-plane/src/chunks/coalescer.rs",
    "control-plane/src/chunks/budget.rs",
    "agent/src/machine.rs|agent/src/machine/",
]

# crate-deps: crate -> workspace crates it must never depend on, directly or not (normal
# dependencies; dev-dependencies are free).
CRATE_DEPS_WHY = ("the control plane is a server library beside the agent, not above it; runtime, "
                  "host and protocol are the shared lower layers and depend on nothing above them.")
CRATE_DEPS = {
    "drover-control-plane": ["drover-agent", "drover-cli"],
    "drover-runtime": ["drover-agent", "drover-control-plane", "drover-cli"],
    "drover-host": ["drover-agent", "drover-control-plane", "drover-cli"],
    "drover-protocol": ["drover-host", "drover-runtime", "drover-agent",
                        "drover-control-plane", "drover-cli"],
}

# Source rules. `scope`/`exempt`: globs over workspace members' `src/` files (`*` stays within a
# directory, `**` crosses them); `forbid`: a regex over code (see the module doc);
# `tests_exempt`: whether `#[cfg(test)]` items and the files they declare are skipped.
SOURCE_RULES = [
    {
        "name": "no-serve-import",
        "why": "serve.rs is wiring only (build App, start services, shut down); a service that "
               "imports it makes the import cycle issue 15 removed. Services get the App.",
        "scope": ["control-plane/src/**"],
        "exempt": ["control-plane/src/serve.rs", "control-plane/src/serve/**"],
        "forbid": r"\b(?:crate|drover_control_plane)::serve\b",
        "tests_exempt": False,
    },
    {
        "name": "services-not-http",
        "why": "the HTTP layer (api*.rs, api/) sits on top of the services and returns view "
               "types; a service that reaches up into it inverts the layering.",
        "scope": ["control-plane/src/**"],
        "exempt": ["control-plane/src/api*.rs", "control-plane/src/api*/**",
                   "control-plane/src/serve.rs", "control-plane/src/serve/**"],
        "forbid": r"\bcrate::api\w*",
        "tests_exempt": False,
    },
    {
        "name": "sql-only-in-store",
        "why": "only store/ knows SQL: the schema and its row types change in one place, and the "
               "domain never sees a rusqlite type.",
        "scope": ["control-plane/src/**"],
        "exempt": ["control-plane/src/store.rs", "control-plane/src/store/**"],
        "forbid": r"\brusqlite\b",
        "tests_exempt": False,
    },
    {
        "name": "store-imports-no-domain",
        "why": "the store has its own row types; domain modules convert at their edge, so a "
               "domain refactor never changes the schema and the store never imports upward.",
        "scope": ["control-plane/src/store.rs", "control-plane/src/store/**"],
        "exempt": [],
        "forbid": r"\bcrate::(?!store\b)\w+",
        "tests_exempt": True,
    },
    {
        "name": "clock-only-in-host",
        "why": "the wall clock is read in one place (drover_host::clock) so time-dependent logic "
               "takes a Clock or a `now` and is tested with a manual clock.",
        "scope": ["**"],
        "exempt": ["host/src/**"],
        "forbid": r"\bSystemTime::now\b|\bUNIX_EPOCH\s*\.\s*elapsed\b",
        "tests_exempt": False,
    },
    {
        "name": "pure-cores",
        "why": "pure cores take `now` and inputs and return decisions: no async runtime, store, "
               "clock, files or MQTT, so they are tested without I/O and shared by both drivers.",
        "scope": None,  # the PURE_CORES paths
        "exempt": [],
        "forbid": r"\b(?:tokio|rusqlite|rumqttc)\b|\bcrate::store\b|\bdrover_host::(?:clock|fs)\b"
                  r"|\bSystemTime\b|\bInstant::now\b|\bstd::(?:fs|net|env)\b",
        "tests_exempt": True,
    },
]

# ---- Machinery -------------------------------------------------------------------------------

_COLONS = re.compile(r"\s*::\s*")
_PATH = re.compile(r"(?<![\w:])(?:r#)?[A-Za-z_]\w*(?:::(?:r#)?[A-Za-z_]\w*|::\*)+")


@functools.lru_cache(maxsize=None)
def glob_re(pattern):
    out = ""
    for part in re.split(r"(\*\*/?|\*)", pattern):
        if part.startswith("**"):
            out += ".*"
        elif part == "*":
            out += "[^/]*"
        else:
            out += re.escape(part)
    return re.compile(out + "$")


def matches(path, globs):
    return any(glob_re(g).match(path) for g in globs)


def members(root):
    """{member dir: parsed Cargo.toml} for the root workspace's members."""
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        ws = tomllib.load(f)
    out = {}
    for pattern in ws.get("workspace", {}).get("members", []):
        dirs = [pattern]
        if "*" in pattern:  # `crates/*`
            dirs = sorted(os.path.relpath(os.path.join(dp, d), root).replace(os.sep, "/")
                          for dp, ds, _ in os.walk(root) for d in ds)
            dirs = [d for d in dirs if glob_re(pattern).match(d)]
        for d in dirs:
            manifest = os.path.join(root, d, "Cargo.toml")
            if os.path.exists(manifest):
                with open(manifest, "rb") as f:
                    out[d] = tomllib.load(f)
    return ws, out


class Module:
    """One source file: its crate, module path and the lines of code the rules read."""

    def __init__(self, root, path, member):
        self.path, self.member = path, member
        with open(os.path.join(root, path), encoding="utf-8") as f:
            self.raw = f.read()
        self.code = rustsrc.strip(self.raw)
        rel = path[len(member) + len("/src/"):]
        parts = rel[:-3].split("/")
        if parts[0] == "bin":  # src/bin/x.rs and src/bin/x/**: crate roots of their own
            self.crate = f"{member}:bin:{parts[1]}"
            parts = parts[2:]
        else:
            self.crate = member
        if parts and parts[-1] in ("mod", "lib", "main"):
            parts = parts[:-1]
        self.modpath = parts
        spans, self.test_mods, whole = rustsrc.test_spans(self.raw, self.code)
        self.test_lines = set()
        for first, last in spans:
            self.test_lines.update(range(first, last + 1))
        if whole:
            self.test_lines.update(range(1, self.code.count("\n") + 2))

    def child_dir(self):
        """Where `mod x;` declared in this file looks for x.rs."""
        d = os.path.dirname(self.path)
        stem = os.path.basename(self.path)[:-3]
        crate_root = stem in ("mod", "lib", "main") or d == f"{self.member}/src/bin"
        return d if crate_root else f"{d}/{stem}"

    def views(self, known):
        """(line number, text) to match: the code of the line, its paths resolved to `crate::`
        form, and the expanded leaves of the use statements ending on it."""

        def resolve(path):
            segs = path.split("::")
            base = list(self.modpath)
            if segs[0] == "self":
                segs = segs[1:]
            elif segs[0] == "super":
                while segs and segs[0] == "super":
                    base, segs = base[:-1], segs[1:]
            elif (self.crate, tuple(base + segs[:1])) not in known:
                return path
            return "::".join(["crate"] + base + segs)

        lines = rustsrc.Lines(self.code)
        extra = defaultdict(list)
        masked, done = [], 0
        for start, end in rustsrc.use_statements(self.code):
            for leaf, line in rustsrc.use_leaves(self.code, start, end, lines):
                extra[line].append(resolve(leaf))
            masked += [self.code[done:start], re.sub(r"[^\n]", " ", self.code[start:end])]
            done = end
        masked.append(self.code[done:])
        for no, text in enumerate("".join(masked).split("\n"), 1):
            text = _COLONS.sub("::", text)
            paths = [resolve(p) for p in _PATH.findall(text)]
            yield no, " ".join([text] + paths + extra[no])


def source_files(root, dirs):
    found = []
    for member in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, member, "src")):
            dirnames.sort()
            found += [(os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/"), member)
                      for n in sorted(filenames) if n.endswith(".rs")]
    return found


def test_only_files(modules):
    """Files that exist only under `#[cfg(test)] mod x;` (e.g. rollout/engine_tests.rs)."""
    by_path = {m.path: m for m in modules}
    out = set()
    for m in modules:
        for name, attr in m.test_mods:
            if attr:
                candidates = [os.path.normpath(f"{os.path.dirname(m.path)}/{attr}")]
            else:
                candidates = [f"{m.child_dir()}/{name}.rs", f"{m.child_dir()}/{name}/mod.rs"]
            for c in candidates:
                if c in by_path:
                    out.add(c)
                    subtree = c[:-len("/mod.rs")] if c.endswith("/mod.rs") else c[:-3]
                    out.update(p for p in by_path if p.startswith(subtree + "/"))
    return out


def pure_core_globs(root):
    globs, problems = [], []
    for core in PURE_CORES:
        alts = core.split("|")
        present = [a for a in alts if os.path.exists(os.path.join(root, a))]
        if not present:
            problems.append((alts[0], "listed pure core does not exist yet"))
        globs += [a + "**" if a.endswith("/") else a for a in present]
    return globs, problems


def check_sources(root, dirs):
    for rule in SOURCE_RULES:
        rule["forbid_re"] = re.compile(rule["forbid"])
    modules = [Module(root, p, member) for p, member in source_files(root, dirs)]
    known = {(m.crate, tuple(m.modpath)) for m in modules}
    test_files = test_only_files(modules)
    core_globs, core_problems = pure_core_globs(root)
    violations = []
    for m in modules:
        views = None
        for rule in SOURCE_RULES:
            scope = rule["scope"] if rule["scope"] is not None else core_globs
            if not matches(m.path, scope) or matches(m.path, rule["exempt"]):
                continue
            if rule["tests_exempt"] and m.path in test_files:
                continue
            if views is None:
                views, raw_lines = list(m.views(known)), m.raw.split("\n")
            for no, view in views:
                if rule["tests_exempt"] and no in m.test_lines:
                    continue
                if rule["forbid_re"].search(view):
                    violations.append((m.path, no, rule["name"], raw_lines[no - 1].strip()))
    return len(modules), violations, core_problems


# ---- crate-deps ------------------------------------------------------------------------------

def manifest_edges(root, ws, manifests):
    """{package: [(dependency package, manifest path, line)]} for normal workspace dependencies."""
    names = {d: t["package"]["name"] for d, t in manifests.items() if "package" in t}
    member_names = set(names.values())
    ws_deps = ws.get("workspace", {}).get("dependencies", {})
    edges = {}
    for d, toml in manifests.items():
        if d not in names:
            continue
        tables = [toml.get("dependencies", {})]
        tables += [t.get("dependencies", {}) for t in toml.get("target", {}).values()]
        manifest = f"{d}/Cargo.toml"
        with open(os.path.join(root, manifest), encoding="utf-8") as f:
            text = f.read().split("\n")
        out = []
        for table in tables:
            for key, spec in table.items():
                pkg = key
                if isinstance(spec, dict):
                    if spec.get("workspace") and isinstance(ws_deps.get(key), dict):
                        pkg = ws_deps[key].get("package", key)
                    pkg = spec.get("package", pkg)
                if pkg in member_names:
                    out.append((pkg, manifest, dep_line(text, key)))
        edges[names[d]] = out
    return names, edges


def dep_line(lines, key):
    """Line of `key` in a normal [dependencies] or [target.*.dependencies] table."""
    section = ""
    for no, line in enumerate(lines, 1):
        h = re.match(r"^\s*\[([^\]]+)\]", line)
        if h:
            section = re.sub(r"\s", "", h.group(1))
            if section in (f"dependencies.{key}", f'dependencies."{key}"') or \
                    re.match(rf"^target\..+\.dependencies\.\"?{re.escape(key)}\"?$", section):
                return no
            continue
        normal = section == "dependencies" or re.match(r"^target\..+\.dependencies$", section)
        if normal and re.match(rf'^\s*"?{re.escape(key)}"?\s*[.=]', line):
            return no
    return 1


def dep_chain(edges, start, bad):
    """Shortest dependency chain start -> ... -> bad as [(package, manifest, line)], or None."""
    seen, queue = {start}, deque([(start, [])])
    while queue:
        pkg, chain = queue.popleft()
        for dep, manifest, line in edges.get(pkg, []):
            step = chain + [(dep, manifest, line)]
            if dep == bad:
                return step
            if dep not in seen:
                seen.add(dep)
                queue.append((dep, step))
    return None


def check_crate_deps(root, skip_cargo):
    ws, manifests = members(root)
    names, edges = manifest_edges(root, ws, manifests)
    dir_of = {n: d for d, n in names.items()}
    violations = []
    for crate, banned in CRATE_DEPS.items():
        if crate not in dir_of:
            continue
        if skip_cargo:
            found = [b for b in banned if dep_chain(edges, crate, b)]
        else:
            cmd = ["cargo", "tree", "-p", crate, "-e", "normal", "--prefix", "none"]
            try:
                tree = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                failure = tree.stderr.strip() if tree.returncode != 0 else None
            except OSError as e:
                failure = str(e)
            if failure is not None:  # unverified is not passed
                violations.append((f"{dir_of[crate]}/Cargo.toml", 1, "crate-deps",
                                   f"`{' '.join(cmd)}` failed: {failure}"))
                continue
            present = {line.split(" ")[0] for line in tree.stdout.splitlines()}
            found = [b for b in banned if b in present]
        for bad in found:
            chain = dep_chain(edges, crate, bad)
            where = (chain[0][1], chain[0][2]) if chain else (f"{dir_of[crate]}/Cargo.toml", 1)
            via = [p for p, _, _ in chain[:-1]] if chain else []
            violations.append((*where, "crate-deps", f"{crate} depends on {bad}"
                               + (f" (via {' -> '.join(via)})" if via else "")))
    return manifests.keys(), violations


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    root = os.path.abspath(root)
    skip_cargo = os.environ.get("LAYERS_SKIP_CARGO") == "1"
    strict = os.environ.get("LAYERS_STRICT") == "1"
    dirs, violations = check_crate_deps(root, skip_cargo)
    nfiles, source_violations, core_problems = check_sources(root, dirs)
    violations += source_violations
    if strict:
        violations += [(path, None, "pure-cores", text) for path, text in core_problems]
    for path, line, rule, text in violations:
        print(f"{path}{'' if line is None else f':{line}'}: {rule}: {text}")
    if not strict:
        for path, text in core_problems:
            print(f"warning: {path}: pure-cores: {text} (not checked)")
    if violations:
        why = {r["name"]: r["why"] for r in SOURCE_RULES} | {"crate-deps": CRATE_DEPS_WHY}
        broken = sorted({v[2] for v in violations})
        print(f"layers: {len(violations)} violation(s) of {', '.join(broken)}", file=sys.stderr)
        for rule in broken:
            print(f"  {rule}: {why[rule]}", file=sys.stderr)
        return 1
    print(f"layers: ok ({len(SOURCE_RULES) + 1} rules, {nfiles} files"
          f"{', crate-deps from Cargo.toml' if skip_cargo else ''}"
          f"{f', {len(core_problems)} warning(s)' if core_problems else ''})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
