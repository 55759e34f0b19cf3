"""Just enough Rust lexing for the `.ci/` source checks (python3 stdlib, no rustc).

`strip` blanks comments and the contents of string and char literals, keeping every other
character (and every newline) at its offset, so a regex or a brace count over the result sees
code only and its offsets and line numbers are those of the source. On that text:
- `functions` finds each `fn` item with a body and the lines from its `fn` to its closing brace;
- `test_spans` finds the items under `#[cfg(test)]` (and the `mod x;` files they declare);
- `use_leaves` expands every `use` tree into full paths (`use a::{b, c::d}` -> `a::b`, `a::c::d`).

Lexing, not parsing: macros are opaque text, and a `{` inside a macro invocation counts like any
other, which is right for rustfmt-formatted code.
"""

import bisect
import re

_IDENT = re.compile(r"[A-Za-z0-9_]")
_RAW_STR = re.compile(r'(?:b|c)?r(#*)"')
_INTERESTING = re.compile(r"[\"'/]|(?<![A-Za-z0-9_])[bcr]")
_CHAR = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F_]{1,8}\}|.)|[^\\\n'])'")


def strip(text):
    """The source with comments and literal contents replaced by spaces (newlines kept)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return re.sub(r"[^\n]", " ", s)

    while i < n:
        c = text[i]
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif c == "/" and text.startswith("/*", i):
            # Block comments nest in Rust.
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif c in "bcr" and (i == 0 or not _IDENT.match(text[i - 1])) and _RAW_STR.match(text, i):
            m = _RAW_STR.match(text, i)
            close = text.find('"' + m.group(1), m.end())
            close = n if close < 0 else close  # unterminated: the rest is literal
            out.append(text[i : m.end()] + blank(text[m.end() : close]))
            i = min(n, close + 1 + len(m.group(1)))
            out.append(text[close:i])
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j, n - 1)
            out.append('"' + blank(text[i + 1 : j]) + '"')
            i = j + 1
        elif c == "'":
            m = _CHAR.match(text, i)
            if m:  # a char literal; otherwise a lifetime or a label, kept as code
                out.append("'" + blank(m.group(0)[1:-1]) + "'")
                i = m.end()
            else:
                out.append(c)
                i += 1
        else:
            # Copy plain code up to the next character that may open a comment or a literal.
            m = _INTERESTING.search(text, i + 1)
            j = m.start() if m else n
            out.append(text[i:j])
            i = j
    return "".join(out)


class Lines:
    """Offset -> 1-based line number."""

    def __init__(self, text):
        self.starts = [0] + [m.end() for m in re.finditer(r"\n", text)]

    def of(self, offset):
        return bisect.bisect_right(self.starts, offset)


def item_end(code, start):
    """Offset just past the item starting at `start`: its `;`, or the brace closing its body.

    `;` and `{` count only outside `()` and `[]`, so `fn f(x: [u8; 4]) -> [u8; 2] {` finds the body.
    Returns (end, has_body).
    """
    depth, i, n = 0, start, len(code)
    while i < n:
        c = code[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif depth <= 0 and c == ";":
            return i + 1, False
        elif depth <= 0 and c == "{":
            return matching_brace(code, i) + 1, True
        i += 1
    return n, False


def matching_brace(code, open_at):
    depth = 0
    for i in range(open_at, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return len(code) - 1


_FN = re.compile(r"\bfn\s+(r#)?([A-Za-z_]\w*)")


def functions(code):
    """(name, first line, last line) of every fn with a body, nested ones included.

    `fn(u8) -> u8` pointer types and `fn $name` in macro_rules have no identifier after `fn`
    and are skipped; trait method declarations end in `;` and are skipped.
    """
    lines = Lines(code)
    found = []
    for m in _FN.finditer(code):
        end, has_body = item_end(code, m.end())
        if has_body:
            found.append((m.group(2), lines.of(m.start()), lines.of(end - 1)))
    return found


_CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
_INNER_CFG_TEST = re.compile(r"#\s*!\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
_ATTR = re.compile(r"\s*#\s*\[")
_MOD_DECL = re.compile(r"\s*(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(?:r#)?(\w+)\s*;")
_PATH_ATTR = re.compile(r'#\s*\[\s*path\s*=\s*"([^"]*)"\s*\]')


def test_spans(raw, code):
    """Where `#[cfg(test)]` code is.

    Returns (spans, test_mods, whole_file): line spans (first, last) of each item under
    `#[cfg(test)]`, the `mod x;` declarations among them as (name, #[path] or None), and whether
    the file opens with `#![cfg(test)]`.
    """
    lines = Lines(code)
    spans, mods = [], []
    for m in _CFG_TEST.finditer(code):
        i = m.end()
        # Skip the other attributes on the same item.
        while True:
            a = _ATTR.match(code, i)
            if not a:
                break
            depth, j = 0, a.end() - 1
            while j < len(code):
                depth += {"[": 1, "]": -1}.get(code[j], 0)
                j += 1
                if depth == 0:
                    break
            i = j
        end, _ = item_end(code, i)
        spans.append((lines.of(m.start()), lines.of(end - 1)))
        decl = _MOD_DECL.match(code, i)
        if decl and decl.end() == end:
            path = _PATH_ATTR.search(raw, m.start(), decl.start())
            mods.append((decl.group(1), path.group(1) if path else None))
    return spans, mods, bool(_INNER_CFG_TEST.search(code))


_USE = re.compile(r"(?<![\w:])use\s")
_TOKEN = re.compile(r"::|[{},*]|(?:r#)?[A-Za-z_]\w*|\S")


def use_statements(code):
    """(start offset, end offset) of each `use ...;` statement."""
    out = []
    for m in _USE.finditer(code):
        end = code.find(";", m.end())
        if end < 0:
            break
        out.append((m.start(), end + 1))
    return out


def use_leaves(code, start, end, lines):
    """Expand one use statement into (path, line of its last segment) pairs.

    `use a::{self, b as c, d::*};` -> `a`, `a::b`, `a::d::*`. Aliases are dropped: the rules care
    about what is imported, not what it is called.
    """
    toks = [(t.group(0), lines.of(t.start())) for t in _TOKEN.finditer(code, start + 3, end - 1)]
    pos = 0

    def peek():
        return toks[pos][0] if pos < len(toks) else None

    def tree(prefix):
        nonlocal pos
        leaves = []
        segs = list(prefix)
        line = toks[pos][1] if pos < len(toks) else lines.of(start)
        if peek() == "::":  # 2015-style leading `::`
            pos += 1
        while pos < len(toks):
            tok, line = toks[pos]
            if tok == "{":
                pos += 1
                while peek() not in (None, "}"):
                    leaves += tree(segs)
                    if peek() == ",":
                        pos += 1
                pos += 1
                return leaves
            if tok in (",", "}"):
                break
            if tok == "as":
                pos += 2
                break
            if tok != "::":
                segs.append(tok[2:] if tok.startswith("r#") else tok)
            pos += 1
        if segs and segs[-1] == "self":
            segs = segs[:-1]
        if segs:
            leaves.append(("::".join(segs), line))
        return leaves

    return tree([])
