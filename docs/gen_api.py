"""Regenerate ``docs/api.md`` (the API reference) from the package's docstrings.

Usage: ``python docs/gen_api.py`` (writes docs/api.md) or ``python docs/gen_api.py --check``
(exit code 1 when docs/api.md is out of date). ``tests/test_api_docs.py`` runs the check.

For every public name (``__all__`` of the package and of its public submodules) the reference
shows the signature, the first line of the docstring, and the shapes: the ``Parameters`` /
``Returns`` entries of numpy-style docstrings (``name : type [shape]``) and the shape comments of
NamedTuple / dataclass fields (``field: Array  # [T, D]``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import pathlib
import re
import sys
import textwrap
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

MODULES = [
    "numpyro_svae",
    "numpyro_svae.nn",
    "numpyro_svae.models",
    "numpyro_svae.predict",
    "numpyro_svae.fitting",
    "numpyro_svae.initialize",
    "numpyro_svae.arhmm",
    "numpyro_svae.diagnostics",
    "numpyro_svae.metrics",
    "numpyro_svae.datasets",
    "numpyro_svae.baselines",
    "numpyro_svae.messages",
    "numpyro_svae.expfam",
    "numpyro_svae.meanfield",
    "numpyro_svae.cli",
]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SECTIONS = ("Parameters", "Returns", "Yields", "Raises", "Notes", "Examples", "See Also",
             "Attributes", "References", "Other Parameters", "Warns")


def _clean(text: str) -> str:
    """Strip memory addresses (not reproducible) and string-annotation quotes."""
    text = _ADDRESS.sub("", text)
    text = re.sub(r"ForwardRef\('([^']*)'\)", r"\1", text)
    return re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


def _section(doc: str, name: str) -> list[tuple[str, str]]:
    """``(name, type)`` entries of a numpy-style docstring section."""
    lines = doc.splitlines()
    out: list[tuple[str, str]] = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() == name and set(lines[i + 1].strip()) == {"-"}:
            j = i + 2
            while j < len(lines):
                cur = lines[j]
                if cur.strip() in _SECTIONS and j + 1 < len(lines) and \
                        set(lines[j + 1].strip()) == {"-"}:
                    break
                if cur and not cur[0].isspace():
                    head, sep, typ = cur.partition(" : ")
                    out.append((head.strip(), typ.strip()) if sep else ("", cur.strip()))
                j += 1
            break
    return out


def _signature(obj: Any, name: str) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return _clean(f"{name}{sig}")


def _field_comments(cls: type) -> dict[str, str]:
    """``field -> comment`` from ``field: type  # comment`` lines of a class body."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines()[1:]:
        m = re.match(r"\s+(\w+)\s*:\s*([^=#]+?)(?:\s*=\s*[^#]*)?\s*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(3).strip()
    return out


def _shape_comment(c: str) -> str:
    """``"[T, D]    E[z_t]"`` -> ``"`[T, D]` E[z_t]"`` (shapes as code, spacing collapsed)."""
    c = re.sub(r"\s{2,}", " ", c.strip())
    m = re.match(r"(\[[^\]]*\](?:\s+or\s+\[[^\]]*\])?)\s*(.*)$", c)
    if m:
        return f"`{m.group(1)}` {m.group(2)}".rstrip()
    return c


def _fields(cls: type) -> list[tuple[str, str, str]]:
    """``(field, type, comment)`` of a NamedTuple or dataclass."""
    comments = _field_comments(cls)
    if hasattr(cls, "_fields"):
        ann = getattr(cls, "__annotations__", {})
        names = list(cls._fields)
    elif dataclasses.is_dataclass(cls):
        ann = {f.name: f.type for f in dataclasses.fields(cls)}
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        return []
    out = []
    for n in names:
        t = ann.get(n, "")
        t = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        out.append((n, _clean(str(t)), comments.get(n, "")))
    return out


def _entry(name: str, obj: Any) -> list[str]:
    lines: list[str] = []
    if inspect.isclass(obj):
        kind = "class"
        if hasattr(obj, "_fields"):
            kind = "NamedTuple"
        elif dataclasses.is_dataclass(obj):
            kind = "dataclass"
        elif issubclass(obj, enum.Enum):
            kind = "Enum"
        lines.append(f"### `{_signature(obj, name)}`")
        lines.append("")
        lines.append(f"*{kind}.* {_first_line(obj)}".rstrip())
        fields = _fields(obj)
        if fields:
            lines.append("")
            for f, t, c in fields:
                extra = f" — {_shape_comment(c)}" if c else ""
                lines.append(f"- `{f}`: {t}{extra}" if t else f"- `{f}`{extra}")
        doc = inspect.getdoc(obj) or ""
        params = _section(doc, "Parameters")
        if params and not fields:
            lines += [""] + [_param_line(p, t) for p, t in params]
        return lines
    if callable(obj):
        lines.append(f"### `{_signature(obj, name)}`")
        lines.append("")
        lines.append(_first_line(obj) or "(no docstring)")
        doc = inspect.getdoc(obj) or ""
        params = _section(doc, "Parameters")
        returns = _section(doc, "Returns")
        if params or returns:
            lines.append("")
        lines += [_param_line(p, t) for p, t in params]
        for p, t in returns:
            lines.append(f"- returns{' `' + p + '`' if p else ''}: {t}" if t else
                         f"- returns: {p}")
        return lines
    r = _clean(repr(obj))
    if len(r) > 90:
        r = r[:87] + "..."
    return [f"### `{name}`", "", f"*constant* `{type(obj).__name__}`: `{r}`"]


def _param_line(p: str, t: str) -> str:
    if not p:
        return f"- {t}"
    names = ", ".join(f"`{q.strip()}`" for q in p.split(","))
    return f"- {names}: {t}" if t else f"- {names}"


def _public(mod: Any) -> list[str]:
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(mod, n)
        if inspect.ismodule(obj):
            continue
        out.append(n)
    return out


def generate() -> str:
    import importlib

    parts = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py` (do not edit by hand; "
        "`tests/test_api_docs.py` checks that it is up to date). Shapes use the letters of "
        "`docs/design.md`: `N` sequences, `T` steps, `K` regimes, `D` latent dim, `Dx` data "
        "dim, `Din` dynamics inputs, `S` samples.",
        "",
        "Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in MODULES),
        "",
    ]
    for modname in MODULES:
        mod = importlib.import_module(modname)
        parts += [f"## {modname}", ""]
        first = _first_line(mod)
        if first:
            parts += [first, ""]
        if modname == "numpyro_svae":
            subs = [n for n in mod.__all__ if inspect.ismodule(getattr(mod, n))]
            parts += ["Submodules: " + ", ".join(f"`{s}`" for s in subs), ""]
        for name in _public(mod):
            parts += _entry(name, getattr(mod, name)) + [""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run `python docs/gen_api.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
