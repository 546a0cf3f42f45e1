"""Every code block of the docs runs, and the API reference matches the docstrings.

How a page is tested (README.md and docs/*.md, one test per page):

- ```` ```python ```` and ```` ```pycon ```` blocks run in order in one namespace
  per page, in a temporary working directory. A block with ``>>>`` prompts runs
  as a doctest (its output is checked, ``...`` matches anything); a block
  without runs as a script, so its ``assert`` statements are the checks.
- ```` ```console ```` / ```` ```bash ```` / ```` ```sh ```` blocks: each ``$ `` line
  (``\\`` continues it) runs in a subprocess, in a scratch folder where ``docs/``
  links to the real one; ``xcnn ...`` is the installed CLI, ``python ...`` this
  interpreter (with the repository on ``PYTHONPATH``), ``mpiexec -n N`` before
  either the distributed extra's launcher, ``VAR=value`` prefixes set the
  environment.
  Output lines after a command are checked against its stdout like a doctest.
  ``pip install`` lines are not run, but every extra they name must exist in
  pyproject.toml.
- A block is skipped only when the line before it says why:
  ``<!-- test: skip (full MNIST, minutes) -->``.
- A block marked ``<!-- test: gpu -->`` needs CuPy and a CUDA device: it runs (in
  its own test, ``test_gpu_blocks_run``) where CuPy answers, and is skipped, with
  CuPy's reason, where it does not (a failure with ``XCNN_REQUIRE_CUPY=1``).
- Commands that would run pytest itself must be marked skip (and a guard
  variable keeps a docs test from ever running inside a command it started).
- Other blocks (```` ```text ````, no language) are not code.

Also here: the doctests of every xcnn module, the committed docs/api.md against
``docs/make_api.py``, and the images and links the pages point at.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import xcnn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))]

PYTHON = {"python", "py", "pycon"}
SHELL = {"console", "bash", "sh", "shell"}
COMMAND_TIMEOUT = 120  # seconds, per command
RECURSION_GUARD = "XCNN_DOCS_TEST_RUNNING"  # set for commands: a docs test never runs inside one
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

_MARKER = re.compile(r"<!--\s*test:(.*?)-->")
_SKIP = re.compile(r"\s*skip\s*\((.*)\)\s*")
_GPU = re.compile(r"\s*gpu\s*")
GPU_REASON = "gpu"  # Block.skip of a gpu block: not run by the CPU test
_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    skip: str | None  # the reason, when marked skip


def blocks(page: str, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a page, each with the skip marker right before it, if any.

    A marker is a line of its own, outside any block, followed (blank lines
    aside) by the block it marks; anything else is an error.
    """
    if text is None:
        text = (ROOT / page).read_text(encoding="utf-8")
    lines = text.splitlines()
    out: list[Block] = []
    marker: tuple[int, str] | None = None  # (line, reason) waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        m_marker = _MARKER.fullmatch(line.strip())
        m_fence = _FENCE.match(line)
        if m_marker:
            assert marker is None, f"{page}:{i + 1}: two test markers in a row"
            m_skip = _SKIP.fullmatch(m_marker.group(1))
            gpu = _GPU.fullmatch(m_marker.group(1))
            assert m_skip or gpu, f"{page}:{i + 1}: unknown test marker {line.strip()!r}"
            reason = GPU_REASON if gpu else m_skip.group(1).strip()
            assert reason, f"{page}:{i + 1}: a skip needs a reason: <!-- test: skip (why) -->"
            marker = (i + 1, reason)
        elif m_fence:
            fence, lang = m_fence.group(1), m_fence.group(2).lower()
            end = i + 1
            while end < len(lines) and lines[end].strip() != fence:
                end += 1
            code = "\n".join(lines[i + 1 : end])
            out.append(Block(page, i + 2, lang, code, marker[1] if marker else None))
            marker = None
            i = end
        elif line.strip():
            assert marker is None, (
                f"{page}:{marker[0]}: a test marker must come right before a block"
            )
        i += 1
    assert marker is None, f"{page}:{marker[0]}: a test marker must come right before a block"
    return out


def existing(page: str) -> str:
    if not (ROOT / page).exists():
        pytest.skip(f"{page} does not exist yet")
    return page


# ---------------------------------------------------------------------------
# Python blocks
# ---------------------------------------------------------------------------


def run_python(block: Block, ns: dict) -> None:
    where = f"{block.page}:{block.line}"
    if ">>>" in block.code:
        test = doctest.DocTestParser().get_doctest(
            block.code, ns, where, str(ROOT / block.page), block.line - 1
        )
        report: list[str] = []
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        runner.run(test, out=report.append, clear_globs=False)
        ns.update(test.globs)  # DocTest works on a copy of the namespace
        if runner.failures:
            pytest.fail(f"doctest in {where} failed:\n" + "".join(report), pytrace=False)
    else:
        # Blank lines in front keep traceback line numbers equal to the Markdown's.
        code = "\n" * (block.line - 1) + block.code
        try:
            exec(compile(code, str(ROOT / block.page), "exec"), ns)
        except Exception:
            pytest.fail(f"code block at {where} raised:\n{traceback.format_exc()}", pytrace=False)


# ---------------------------------------------------------------------------
# Shell blocks
# ---------------------------------------------------------------------------


def commands(code: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` pairs of a console block."""
    lines = code.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    out: list[tuple[str, list[str]]] = []
    pending = ""
    for line in lines:
        if pending:
            pending += " " + line.strip()
        elif prompted and line.startswith("$ "):
            pending = line[2:].strip()
        elif not prompted and line.strip() and not line.lstrip().startswith("#"):
            pending = line.strip()
        elif out and line.strip():
            out[-1][1].append(line)
            continue
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append((pending, []))
        pending = ""
    return out


def extras() -> set[str]:
    """The optional-dependency groups of pyproject.toml (no tomllib on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*=", section, re.M))


def check_install(cmd: str, where: str) -> None:
    named = {
        e.strip() for group in re.findall(r"(?:xcnn|\.)\[([^\]]+)\]", cmd) for e in group.split(",")
    }
    unknown = named - extras()
    assert not unknown, f"{where}: `{cmd}` names extras {sorted(unknown)} not in pyproject.toml"


def argv_for(cmd: str, where: str) -> tuple[list[str], dict[str, str]]:
    words = shlex.split(cmd)
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words, f"{where}: empty command {cmd!r}"
    if words[0] == "mpiexec" and len(words) > 3 and words[1] == "-n":  # the distributed extra's
        launcher = xcnn.distributed.find_mpiexec()
        assert launcher, f"{where}: `{cmd}` needs mpiexec: pip install 'xcnn[distributed]'"
        inner, inner_env = argv_for(shlex.join(words[3:]), where)
        return [launcher, "-n", words[2], *inner], {**env, **inner_env}
    if words[0] == "xcnn":
        script = shutil.which("xcnn", path=str(Path(sys.executable).parent))
        head = [script] if script else [sys.executable, "-m", "xcnn"]
        return head + words[1:], env
    if words[0] in ("python", "python3"):
        return [sys.executable, *words[1:]], env
    pytest.fail(
        f"{where}: don't know how to run `{cmd}`; docs commands are `xcnn ...` or "
        "`python ...`, anything else needs <!-- test: skip (why) --> before its block",
        pytrace=False,
    )


def run_shell(block: Block, cwd: Path) -> None:
    for line, expected in commands(block.code):
        where = f"{block.page}:{block.line}"
        parts = line.split(" && ")
        for cmd in parts[:-1]:
            run_command(cmd, [], where, cwd)
        run_command(parts[-1], expected, where, cwd)


def run_command(cmd: str, expected: list[str], where: str, cwd: Path) -> None:
    if re.match(r"(python -m )?pip3? install\b", cmd):
        check_install(cmd, where)
        return
    if re.search(r"\bpytest\b", cmd):
        pytest.fail(
            f"{where}: `{cmd}` would run the test suite inside itself; "
            "put <!-- test: skip (runs pytest itself) --> before its block",
            pytrace=False,
        )
    argv, extra_env = argv_for(cmd, where)
    env = {
        **os.environ,
        **extra_env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "MPLBACKEND": "Agg",
        RECURSION_GUARD: "1",
    }
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: `{cmd}` ran over {COMMAND_TIMEOUT} s; mark it skip", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{where}: `{cmd}` exited {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    want = "\n".join(expected) + "\n" if expected else ""
    if want and not doctest.OutputChecker().check_output(want, proc.stdout, FLAGS):
        pytest.fail(
            f"{where}: `{cmd}` printed\n{proc.stdout}\nbut the page shows\n{want}",
            pytrace=False,
        )


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    existing(page)
    if os.environ.get(RECURSION_GUARD):
        pytest.skip("inside a command run by the docs test")
    # Commands run in a scratch folder; `docs/...` paths (the make_* scripts) resolve.
    (tmp_path / "docs").symlink_to(DOCS, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ns: dict = {"__name__": f"docs:{page}"}
    for block in blocks(page):
        if block.skip is not None:
            for cmd, _ in commands(block.code) if block.lang in SHELL else []:
                if re.match(r"(python -m )?pip3? install\b", cmd):
                    check_install(cmd, f"{page}:{block.line}")
            continue
        if block.lang in PYTHON:
            run_python(block, ns)
        elif block.lang in SHELL:
            run_shell(block, tmp_path)


def _gpu_pages() -> list[str]:
    return [
        p for p in PAGES if (ROOT / p).exists() and any(b.skip == GPU_REASON for b in blocks(p))
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("page", _gpu_pages())
def test_gpu_blocks_run(page, tmp_path, monkeypatch):
    """The CuPy examples, where CuPy answers: a GPU run checks them like the rest."""
    try:
        xcnn.resolve_backend("cupy")
    except xcnn.BackendError as e:
        if os.environ.get("XCNN_REQUIRE_CUPY", "") not in ("", "0"):
            raise
        pytest.skip(f"CuPy unavailable: {e}")
    if os.environ.get(RECURSION_GUARD):
        pytest.skip("inside a command run by the docs test")
    (tmp_path / "docs").symlink_to(DOCS, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ns: dict = {"__name__": f"docs:{page}:gpu"}
    for block in blocks(page):
        if block.skip != GPU_REASON:
            continue
        if block.lang in PYTHON:
            run_python(block, ns)
        elif block.lang in SHELL:
            run_shell(block, tmp_path)


@pytest.mark.parametrize("page", PAGES)
def test_page_markers_images_and_links(page):
    existing(page)
    text = (ROOT / page).read_text(encoding="utf-8")
    for block in blocks(page):  # every marker parses, has a reason, sits right before a block
        assert block.skip is None or block.lang in PYTHON | SHELL, (
            f"{page}:{block.line}: skip marker on a {block.lang or 'plain'} block, which never runs"
        )
    base = (ROOT / page).parent
    for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # URLs
        path = (base / target).resolve() if target else ROOT / page
        assert path.exists(), f"{page} links to {target}, which does not exist"
        if path.suffix == ".png":
            assert path.stat().st_size < 250_000, f"{target} is over 250 KB"
        if anchor and path.suffix == ".md":
            known = anchors(path.read_text(encoding="utf-8"))
            assert anchor in known, f"{page} links to {target}#{anchor}: no such heading"


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    found: set[str] = set()
    in_code = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n, unique = 0, slug
            while unique in found:
                n += 1
                unique = f"{slug}-{n}"
            found.add(unique)
    return found


def test_every_page_has_code():
    """A page without code blocks is fine, but the parser finding none in all is a bug."""
    counts = {p: len(blocks(p)) for p in PAGES if (ROOT / p).exists()}
    assert sum(counts.values()) > 0, counts


def test_api_md_is_current():
    sys.path.insert(0, str(DOCS))
    try:
        make_api = importlib.import_module("make_api")
    finally:
        sys.path.remove(str(DOCS))
    committed = (DOCS / "api.md").read_text(encoding="utf-8")
    generated = make_api.render()
    if committed != generated:
        import difflib

        diff = "\n".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(),
                    generated.splitlines(),
                    "docs/api.md",
                    "generated",
                    lineterm="",
                )
            )[:40]
        )
        pytest.fail(f"docs/api.md is stale: run `python docs/make_api.py`\n{diff}", pytrace=False)


MODULES = sorted(
    m.name for m in pkgutil.walk_packages(xcnn.__path__, "xcnn.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    if runner.failures:
        pytest.fail(f"doctests of {name} failed:\n" + "".join(report), pytrace=False)


SAMPLE_PAGE = """\
Text.

<!-- test: skip (needs a GPU) -->

```python
import cupy
```

```console
$ xcnn train \\
    --epochs 1
epoch 1: ...
$ pip install 'xcnn[plot]'
```

```text
not code
```
"""


def test_parser_finds_blocks_markers_and_commands():
    found = blocks("sample.md", SAMPLE_PAGE)
    assert [(b.lang, b.skip, b.line) for b in found] == [
        ("python", "needs a GPU", 6),
        ("console", None, 10),
        ("text", None, 17),
    ]
    assert commands(found[1].code) == [
        ("xcnn train --epochs 1", ["epoch 1: ..."]),
        ("pip install 'xcnn[plot]'", []),
    ]
    check_install("pip install 'xcnn[plot,cuda12]'", "here")
    with pytest.raises(AssertionError, match="not in pyproject"):
        check_install("pip install 'xcnn[gpu]'", "here")


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- test: skip () -->\n```python\n```\n", "needs a reason"),
        ("<!-- test: skip (why) -->\nsome text\n```python\n```\n", "right before a block"),
        ("<!-- test: skipp (why) -->\n```python\n```\n", "unknown test marker"),
        ("<!-- test: skip (why) -->\n", "right before a block"),
    ],
)
def test_parser_rejects_bad_markers(text, message):
    with pytest.raises(AssertionError, match=message):
        blocks("bad.md", text)
