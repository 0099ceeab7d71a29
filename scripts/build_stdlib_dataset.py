"""Build the quickstart dataset: "write this function" tasks from the Python standard library's own source.

Each row is alpaca-style: the instruction gives a documented stdlib function's signature and docstring,
the output is the function's source without its docstring. Real, offline, licensed under the PSF
license like the source it comes from. Run:  python scripts/build_stdlib_dataset.py
(writes src/snugtune/bundled/stdlib_functions.jsonl; docs/data.md describes it).
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

DOCSTRING_FOLLOWS = " Its docstring says:\n\n"  # between a task and its docstring (the pairs script splits there)

MODULES = ["bisect", "heapq", "textwrap", "shlex", "fnmatch", "posixpath", "ntpath", "genericpath", "colorsys",
           "calendar", "statistics", "difflib", "base64", "quopri", "html/__init__", "urllib/parse", "ipaddress",
           "fractions", "glob", "string", "keyword", "operator", "copy", "shutil", "tempfile", "pprint",
           "reprlib", "inspect", "tokenize", "json/encoder", "json/decoder", "email/utils", "email/quoprimime",
           "email/base64mime", "csv", "gettext", "locale", "mimetypes", "netrc", "nturl2path", "os", "pathlib",
           "platform", "plistlib", "py_compile", "random", "re/_parser", "sched", "secrets", "socket", "stat",
           "sysconfig", "tarfile", "uu", "warnings", "wave", "zipfile", "dataclasses", "enum", "functools",
           "types", "typing", "ast", "dis", "codecs", "filecmp", "hmac", "imghdr", "linecache", "traceback"]
BUNDLED = Path(__file__).resolve().parent.parent / "src" / "snugtune" / "bundled"
OUT = BUNDLED / "stdlib_functions.jsonl"
RETENTION = BUNDLED / "retention_docs.jsonl"
# General English prose about programming that the quickstart never trains on: the module docstrings of
# standard-library modules outside MODULES, for the retention check (loss before vs after fine-tuning).
RETENTION_MODULES = ["argparse", "asyncio/__init__", "collections/__init__", "contextlib", "datetime", "decimal",
                     "doctest", "email/__init__", "ftplib", "getopt", "gzip", "hashlib", "http/client",
                     "imaplib", "logging/__init__", "mailbox", "multiprocessing/pool", "optparse", "pdb",
                     "pickle", "pickletools", "poplib", "pydoc", "queue", "selectors", "shelve", "smtplib",
                     "socketserver", "sqlite3/__init__", "ssl", "subprocess", "symtable", "tabnanny",
                     "telnetlib", "threading", "timeit", "trace", "unittest/__init__", "urllib/request",
                     "uuid", "weakref", "xml/dom/minidom", "zipimport", "bdb", "cmd", "code", "codeop",
                     "configparser", "contextvars", "copyreg", "crypt", "fileinput", "graphlib", "heapq"]


def functions(path: Path, module: str):
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 40 or len(doc) > 900:
            continue
        body = node.body[1:]  # without the docstring
        if not body:
            continue
        header = "\n".join(lines[node.lineno - 1: node.body[0].lineno - 1]).rstrip()
        start = body[0].lineno - 1
        code_lines = lines[start: node.end_lineno]
        if not 3 <= len(code_lines) <= 40:
            continue
        code = header + "\n" + "\n".join(code_lines)
        if len(code) > 1600:
            continue
        signature = header.strip().removeprefix("def ").rstrip(":")
        yield {"instruction": f"Write the Python function `{signature}` from the standard library module "
                              f"`{module.replace('/__init__', '').replace('/', '.')}`.{DOCSTRING_FOLLOWS}{doc}",
               "input": "", "output": code}


def write_rows(path: Path, rows: list[dict]) -> None:
    """One JSON row a line, UTF-8 kept as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for module in MODULES:
        path = stdlib / f"{module}.py"
        if path.is_file():
            rows.extend(functions(path, module))
    write_rows(OUT, rows)
    print(f"{len(rows)} rows from Python {sys.version.split()[0]}'s standard library -> {OUT}")
    docs = []
    for module in RETENTION_MODULES:
        path = stdlib / f"{module}.py"
        if module.split("/")[0] in {m.split("/")[0] for m in MODULES} or not path.is_file():
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if doc and len(doc) >= 200:
            docs.append({"text": doc[:3000]})
    write_rows(RETENTION, docs)
    print(f"{len(docs)} module docstrings for the retention check -> {RETENTION}")


if __name__ == "__main__":
    main()
