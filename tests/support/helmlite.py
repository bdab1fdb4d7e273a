"""helmlite: a small Go-template renderer for the Helm chart's tests (no Helm binary in CI).

Called by tests/integration/test_chart.py: `Chart(path).render(values)` returns every template's output,
`manifests()` the parsed YAML documents. It implements only the subset charts/reup uses:
actions with `-` trimming and comments; `if`/`else if`/`else`, `with`, `range` (lists, maps in
sorted key order, `$k, $v :=`), `define` and `include`, variables (`$x :=`, `$x =`, `$`), field
chains (`.Values.a.b`, `$v.x`), `.Files.Get`, parentheses, pipes, and the functions in `FUNCS`.
Anything else (another keyword, an unknown function, a missing value, printing a map) raises
`TemplateError`, so a template never passes by being half understood. Helm semantics kept on
purpose: numbers from values are float64 (so `gt .Values.replicas 1` fails as it does in Helm,
and numbers print in Go's `%v` form), maps range and serialize in sorted key order.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from .helmfuncs import (
    FUNCS,
    RenderFail,
    TemplateError,
    as_float64,
    go_float,
    go_str,
    kind,
    merge_overwrite,
    truth,
)

__all__ = ["Chart", "RenderFail", "TemplateError", "go_float", "manifests"]

TOKEN = re.compile(r"""
    (?P<ws>\s+) | (?P<close>-?\}\}) | (?P<comment>/\*.*?\*/)
  | (?P<str>"(?:[^"\\\n]|\\.)*") | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?) | (?P<decl>:=) | (?P<assign>=) | (?P<punct>[()|,])
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_]\w*)*) | (?P<field>(?:\.[A-Za-z_]\w*)+|\.)
  | (?P<ident>[A-Za-z_]\w*)
""", re.X | re.S)
UNSUPPORTED = {"template", "block", "break", "continue"}
LITERALS: dict[str, Any] = {"true": True, "false": False, "nil": None}


@dataclass
class Tok:
    kind: str
    text: str


@dataclass
class Action:
    toks: list[Tok]
    where: str


@dataclass
class Node:
    kind: str  # text, out, if, with, range, assign
    text: str = ""
    pipe: list[list[Tok]] = field(default_factory=list)
    body: list[Node] = field(default_factory=list)
    other: list[Node] = field(default_factory=list)  # else branch (an `else if` is a nested if)
    names: list[str] = field(default_factory=list)  # range/assign variables
    declare: bool = False


def lex(src: str, name: str) -> list[str | Action]:
    """Text and actions, with `{{- ` / ` -}}` trimming applied to the neighbouring text."""
    items: list[str | Action] = []
    pos, trim_next = 0, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if start < 0:
            items.append(text)
            return items
        i = start + 2
        if src.startswith("- ", i) or src.startswith("-\n", i) or src.startswith("-\t", i):
            text, i = text.rstrip(" \t\r\n"), i + 1
        items.append(text)
        where = f"{name}:{src.count(chr(10), 0, start) + 1}"
        toks: list[Tok] = []
        comment = False
        while True:
            m = TOKEN.match(src, i)
            if m is None or m.lastgroup is None:
                raise TemplateError(f"{where}: cannot read {src[i:i + 20]!r}")
            i = m.end()
            kind, tok = m.lastgroup, m.group()
            if kind == "close":
                if tok.startswith("-") and not src[m.start() - 1].isspace():
                    raise TemplateError(f"{where}: '-}}}}' needs a space before it")
                trim_next = tok.startswith("-")
                break
            if kind != "ws" and (comment or (kind == "comment" and toks)):
                raise TemplateError(f"{where}: a comment must be the whole action")
            comment = comment or kind == "comment"
            if kind not in ("ws", "comment"):
                toks.append(Tok(kind, tok))
        if toks:
            items.append(Action(toks, where))
        pos = i


class Parser:
    """Turns lexed items into a node tree; `define`s go to `templates`."""

    def __init__(self, items: list[str | Action], templates: dict[str, list[Node]]) -> None:
        self.items, self.i, self.templates = items, 0, templates

    def parse(self, top: bool = True) -> tuple[list[Node], Action | None]:
        nodes: list[Node] = []
        while self.i < len(self.items):
            item = self.items[self.i]
            self.i += 1
            if isinstance(item, str):
                if item:
                    nodes.append(Node("text", text=item))
                continue
            head = item.toks[0]
            word = head.text if head.kind == "ident" else ""
            if word in UNSUPPORTED:
                raise TemplateError(f"{item.where}: '{word}' is not supported by helmlite")
            if word in ("else", "end"):
                if top:
                    raise TemplateError(f"{item.where}: unexpected '{word}'")
                return nodes, item
            if word == "define":
                if not top or len(item.toks) != 2 or item.toks[1].kind != "str":
                    raise TemplateError(f"{item.where}: define takes one quoted name, at top level")
                body, end = self.parse(top=False)
                self._expect_end(end, item)
                self.templates[json.loads(item.toks[1].text)] = body
            elif word in ("if", "with", "range"):
                nodes.append(self._block(word, item))
            elif head.kind == "var" and len(item.toks) > 1 and item.toks[1].kind in ("decl", "assign"):
                nodes.append(Node("assign", names=[head.text], declare=item.toks[1].kind == "decl",
                                  pipe=split_pipe(item.toks[2:], item.where)))
            else:
                nodes.append(Node("out", pipe=split_pipe(item.toks, item.where)))
        if not top:
            raise TemplateError("unclosed block at end of template")
        return nodes, None

    def _block(self, word: str, item: Action) -> Node:
        toks, names = item.toks[1:], []
        if word == "range" and any(t.kind == "decl" for t in toks):
            decl = next(k for k, t in enumerate(toks) if t.kind == "decl")
            names = [t.text for t in toks[:decl] if t.kind == "var"]
            if not 1 <= len(names) <= 2 or len(toks[:decl]) != 2 * len(names) - 1:
                raise TemplateError(f"{item.where}: range takes '$v :=' or '$k, $v :='")
            toks = toks[decl + 1:]
        node = Node(word, pipe=split_pipe(toks, item.where), names=names)
        node.body, end = self.parse(top=False)
        assert end is not None
        if end.toks[0].text == "else":
            if len(end.toks) > 1:
                if word != "if" or end.toks[1].text != "if":
                    raise TemplateError(f"{end.where}: only 'else if' is supported after else")
                node.other = [self._block("if", Action(end.toks[1:], end.where))]
                return node
            node.other, end = self.parse(top=False)
        self._expect_end(end, item)
        return node

    @staticmethod
    def _expect_end(end: Action | None, opened: Action) -> None:
        if end is None or end.toks[0].text != "end" or len(end.toks) != 1:
            raise TemplateError(f"{opened.where}: block not closed by {{{{ end }}}}")


def split_pipe(toks: list[Tok], where: str) -> list[list[Tok]]:
    """A pipeline's commands; checks every function name now, so untaken branches are checked too."""
    cmds: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        if t.kind == "punct" and t.text == "|" and depth == 0:
            cmds.append([])
            continue
        depth += {"(": 1, ")": -1}.get(t.text, 0) if t.kind == "punct" else 0
        if t.kind == "ident" and t.text not in FUNCS and t.text not in LITERALS:
            raise TemplateError(f"{where}: unknown function or keyword '{t.text}'")
        if t.kind in ("decl", "assign") or (t.kind == "punct" and t.text == ","):
            raise TemplateError(f"{where}: unexpected '{t.text}'")
        cmds[-1].append(t)
    if depth != 0 or any(not c for c in cmds):
        raise TemplateError(f"{where}: malformed pipeline")
    return cmds


class Renderer:
    """Executes node trees; one per chart render (holds the named templates)."""

    def __init__(self, templates: dict[str, list[Node]]) -> None:
        self.templates = templates
        self.funcs = dict(FUNCS, include=self.include)

    def include(self, name: str, data: Any) -> str:
        if name not in self.templates:
            raise TemplateError(f"include: no template named {name!r}")
        return self.run(self.templates[name], data)

    def run(self, nodes: list[Node], dot: Any) -> str:
        return "".join(self._exec(nodes, dot, [{"$": dot}]))

    def _exec(self, nodes: list[Node], dot: Any, scopes: list[dict[str, Any]]) -> Iterator[str]:
        scopes = scopes + [{}]
        for n in nodes:
            if n.kind == "text":
                yield n.text
            elif n.kind == "out":
                yield go_str(self.pipe(n.pipe, dot, scopes))
            elif n.kind == "assign":
                value = self.pipe(n.pipe, dot, scopes)
                target = scopes[-1] if n.declare else next((s for s in reversed(scopes) if n.names[0] in s), None)
                if target is None:
                    raise TemplateError(f"assignment to undeclared {n.names[0]}")
                target[n.names[0]] = value
            elif n.kind == "if":
                yield from self._exec(n.body if truth(self.pipe(n.pipe, dot, scopes)) else n.other, dot, scopes)
            elif n.kind == "with":
                value = self.pipe(n.pipe, dot, scopes)
                yield from self._exec(n.body, value, scopes) if truth(value) else self._exec(n.other, dot, scopes)
            else:
                yield from self._range(n, dot, scopes)

    def _range(self, n: Node, dot: Any, scopes: list[dict[str, Any]]) -> Iterator[str]:
        value = self.pipe(n.pipe, dot, scopes)
        if isinstance(value, dict):
            pairs: list[tuple[Any, Any]] = sorted(value.items())
        elif isinstance(value, list):
            pairs = list(enumerate(value))
        elif value is None:
            pairs = []
        else:
            raise TemplateError(f"range over a {kind(value)}")
        for key, elem in pairs:
            names = dict(zip(n.names, [key, elem] if len(n.names) == 2 else [elem], strict=False))
            yield from self._exec(n.body, elem, scopes + [names])
        if not pairs:
            yield from self._exec(n.other, dot, scopes)

    def pipe(self, cmds: list[list[Tok]], dot: Any, scopes: list[dict[str, Any]]) -> Any:
        result: Any = None
        for k, cmd in enumerate(cmds):
            args, j = [], 0
            while j < len(cmd):
                if cmd[j].text == "(":
                    depth, end = 0, j
                    for end in range(j, len(cmd)):
                        depth += {"(": 1, ")": -1}.get(cmd[end].text, 0) if cmd[end].kind == "punct" else 0
                        if depth == 0:
                            break
                    args.append(self.pipe(split_pipe(cmd[j + 1:end], "(...)"), dot, scopes))
                    j = end + 1
                else:
                    args.append(cmd[j])
                    j += 1
            piped = [result] if k > 0 else []
            head = args[0]
            if isinstance(head, Tok) and head.kind == "ident" and head.text not in LITERALS:
                fn = self.funcs[head.text]
                params = [self.value(a, dot, scopes) for a in args[1:]] + piped
            else:
                target = self.value(head, dot, scopes)
                params = [self.value(a, dot, scopes) for a in args[1:]] + piped
                if not callable(target):
                    if params:
                        raise TemplateError(f"{go_str(target)!r} is not a function")
                    result = target
                    continue
                fn = target
            try:
                result = fn(*params)
            except TemplateError:
                raise
            except Exception as exc:
                raise TemplateError(f"{getattr(head, 'text', head)}: {exc!r}") from exc
        return result

    def value(self, a: Any, dot: Any, scopes: list[dict[str, Any]]) -> Any:
        if not isinstance(a, Tok):
            return a
        if a.kind == "str":
            return json.loads(a.text)
        if a.kind == "raw":
            return a.text[1:-1]
        if a.kind == "num":
            return float(a.text) if "." in a.text else int(a.text)
        if a.kind == "ident" and a.text in LITERALS:
            return LITERALS[a.text]
        if a.kind == "field":
            return self.chain(dot, a.text.split(".")[1:], a.text)
        if a.kind == "var":
            name, *rest = a.text.split(".")
            scope = next((s for s in reversed(scopes) if name in s), None)
            if scope is None:
                raise TemplateError(f"undefined variable {name}")
            return self.chain(scope[name], rest, a.text)
        raise TemplateError(f"unexpected {a.text!r} as a value")

    @staticmethod
    def chain(v: Any, names: list[str], text: str) -> Any:
        for name in [n for n in names if n]:
            if not isinstance(v, dict) or name not in v:
                raise TemplateError(f"{text}: no value '{name}' (helmlite is strict about missing keys)")
            v = v[name]
        return v


class Chart:
    """A chart directory: Chart.yaml, values.yaml, templates/ and the files `.Files.Get` reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(os.path.join(path, "Chart.yaml"), encoding="utf-8") as f:
            meta = yaml.safe_load(f)
        self.meta = {k[0].upper() + k[1:]: v for k, v in meta.items()}
        with open(os.path.join(path, "values.yaml"), encoding="utf-8") as f:
            self.defaults: dict[str, Any] = yaml.safe_load(f)
        self.templates: dict[str, list[Node]] = {}
        self.files: list[str] = []
        tdir = os.path.join(path, "templates")
        for name in sorted(os.listdir(tdir)):
            with open(os.path.join(tdir, name), encoding="utf-8") as f:
                nodes, _ = Parser(lex(f.read(), name), self.templates).parse()
            full = f"{self.meta['Name']}/templates/{name}"
            self.templates[full] = nodes
            if not name.startswith("_"):
                self.files.append(full)
            elif "".join(n.text for n in nodes if n.kind == "text").strip() or any(n.kind != "text" for n in nodes):
                raise TemplateError(f"{name}: a partial may hold only defines")

    def values(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return merge_overwrite(copy.deepcopy(self.defaults), overrides or {})

    def render(self, overrides: dict[str, Any] | None = None, *, release: str = "reup",
               namespace: str = "default") -> dict[str, str]:
        """Every non-partial template's output, by name (e.g. 'reup/templates/service.yaml')."""
        def get(rel: str) -> str:
            with open(os.path.join(self.path, rel), encoding="utf-8") as f:
                return f.read()
        renderer = Renderer(self.templates)
        out = {}
        for name in self.files:
            root = {"Values": as_float64(self.values(overrides)), "Chart": self.meta, "Files": {"Get": get},
                    "Release": {"Name": release, "Namespace": namespace, "Service": "Helm",
                                "IsInstall": True, "IsUpgrade": False, "Revision": 1},
                    "Template": {"Name": name, "BasePath": f"{self.meta['Name']}/templates"}}
            out[name] = renderer.run(self.templates[name], root)
        return out


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The YAML documents of rendered templates (NOTES.txt is text, not a manifest)."""
    docs = []
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                if not isinstance(doc, dict):
                    raise TemplateError(f"{name}: a document is not a mapping: {doc!r}")
                docs.append(doc)
    return docs
