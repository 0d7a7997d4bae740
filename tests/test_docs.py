"""README.md and docs/*.md work as written.

- Every ```python block is a complete program: it runs, in a fresh process with a fresh Inductor
  cache, from an empty folder, and exits 0. A block that is a fragment by nature says so with
  ``<!-- fragment -->`` on the line before its fence, and is only compiled (syntax-checked).
- Every ```bash block names things that exist: repository files and scripts, ``python -m`` modules,
  ``lynx-compile`` subcommands, and every flag given to a repository script or subcommand (checked
  against its ``--help``). The commands themselves (venv creation, benchmarks, the demo) are not run.
- README.md stays within 200 lines and keeps CI's test command; every relative link resolves inside
  the repository; no document points at notes that users do not have.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
LANGUAGES = {"python", "bash", "json", "text"}
TEST_COMMAND = ".venv/bin/python -m pytest -q"
README_MAX_LINES = 200
MAX_FRAGMENTS = 2
WORKERS = 2  # subprocesses at a time (the CI machine has 2 cores)
MAX_WORDS_PER_OPTION_CELL = 35
MAX_WORDS_PER_TABLE_CELL = 60
PYTHONS = {"python", "python3", ".venv/bin/python"}
# Programs that are not part of this repository and that a command line may use.
EXTERNAL_PROGRAMS = {"git", "nvidia-smi", "tlparse", "cd", "export"}
REPO_DIRS = ("examples/", "benchmarks/", "lynx_compile/", "passes/", "kernels/", "tests/", "docs/", ".ci/")
PRIVATE_NOTES = ("shared/", "DESIGN.md", "KERNELS.md")


# ---- parsing markdown ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    path: Path
    line: int       # 1-based line of the opening fence
    lang: str
    code: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file (indented fences, inside list items, included)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, indent, fence = i, len(match["indent"]), match["fence"]
        body = []
        i += 1
        while i < len(lines) and not re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line)
            i += 1
        assert i < len(lines), f"{path.relative_to(REPO)}:{start + 1}: the code fence is never closed"
        previous = lines[start - 1].strip() if start > 0 else ""
        lang = match["info"].strip().split()[0] if match["info"].strip() else ""
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", previous == FRAGMENT))
        i += 1
    return blocks


def prose(path: Path) -> str:
    """The file's text without its fenced code blocks (so that `# comments` are not headings)."""
    lines, out, fence = path.read_text().splitlines(), [], None
    for line in lines:
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
            out.append("")
        elif fence is not None:
            if re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path), flags=re.M):
        base = github_anchor(match[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return frozenset(result)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline markdown link outside code."""
    out = []
    for number, line in enumerate(prose(path).splitlines(), 1):
        line = re.sub(r"`[^`]*`", "code", line)
        out += [(number, m[1]) for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)]
    return out


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s:|-]+\|?", line):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def section(path: Path, heading: str) -> str:
    """The text of a markdown section, up to the next heading of the same or a higher level."""
    text = prose(path)
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    following = re.search(rf"^#{{1,{level}}} ", text[start + len(heading):], flags=re.M)
    return text[start: start + len(heading) + following.start()] if following else text[start:]


ALL_BLOCKS = [block for doc in DOCUMENTS for block in code_blocks(doc)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
BASH_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "bash"]


# ---- bash: what a command line names -----------------------------------------------------------------
def command_lines(code: str) -> list[list[str]]:
    """Each simple command of a bash block, as argv (comments dropped, `&&`, `||`, `;`, `|` split)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if set(token) <= set(";&|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    commands = [[t for t in c] for c in commands if c]
    # leading VAR=value assignments are environment, not the program
    return [c[next((i for i, t in enumerate(c) if not re.fullmatch(r"[A-Za-z_]\w*=.*", t)), len(c)):] for c in commands]


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.match(r"--?[A-Za-z]", a)]


@dataclass
class Checks:
    """What one command line must satisfy; the --help runs are gathered and run together."""

    errors: list[str] = dataclasses.field(default_factory=list)
    # (argv of a --help run, flags that its output must accept, what the flags were given to)
    helps: list[tuple[tuple[str, ...], list[str], str]] = dataclasses.field(default_factory=list)
    cli: list[str] = dataclasses.field(default_factory=list)  # lynx-compile subcommands used

    checked: set[str] = dataclasses.field(default_factory=set)

    def exists(self, relative: str, what: str) -> None:
        if relative in self.checked:
            return
        self.checked.add(relative)
        if not (REPO / relative).exists():
            self.errors.append(f"{what} {relative!r} does not exist in the repository")

    def lynx_compile(self, args: list[str], shown: str) -> None:
        if not args or args[0].startswith("-"):
            self.errors.append(f"{shown}: no subcommand")
            return
        self.cli.append(args[0])
        self.helps.append((("-m", "lynx_compile", args[0], "--help"), flags_of(args[1:]), f"lynx-compile {args[0]}"))


def check_command(argv: list[str], checks: Checks) -> None:
    shown = " ".join(argv)
    program, args = argv[0], argv[1:]
    for token in argv:
        if token.startswith(REPO_DIRS) or re.fullmatch(r"[\w.-]+\.(txt|toml|sh)", token):
            checks.exists(token.rstrip("/"), f"{shown}: path")
    if program in PYTHONS:
        if args[:1] == ["-c"]:
            return
        if args[:1] == ["-m"]:
            module, rest = args[1], args[2:]
            if module == "lynx_compile":
                checks.lynx_compile(rest, shown)
            elif module == "pytest":
                for token in rest:
                    if token.endswith(".py") or "/" in token:
                        checks.exists(token.split("::")[0], f"{shown}: test path")
            elif module not in ("venv", "pip"):
                checks.errors.append(f"{shown}: python -m {module} is not a module this repository documents")
            return
        script = args[0]
        checks.exists(script, f"{shown}: script")
        if (REPO / script).is_file() and script.endswith(".py"):
            checks.helps.append(((script, "--help"), flags_of(args[1:]), script))
    elif program == "lynx-compile":
        pyproject = (REPO / "pyproject.toml").read_text()
        if not re.search(r'^lynx-compile\s*=\s*"lynx_compile\.cli:main"', pyproject, flags=re.M):
            checks.errors.append(f"{shown}: pyproject.toml declares no lynx-compile script")
        checks.lynx_compile(args, shown)
    elif program in ("bash", "sh"):
        checks.exists(args[0], f"{shown}: script")
    elif program == "pip" or program.endswith("/pip"):
        for option, value in zip(args, args[1:]):
            if option in ("-r", "-e"):
                checks.exists(value, f"{shown}: {option}")
    elif program not in EXTERNAL_PROGRAMS:
        checks.errors.append(f"{shown}: {program!r} is neither in the repository nor a known tool")


def checks_of(block: Block) -> Checks:
    checks = Checks()
    for argv in command_lines(block.code):
        check_command(argv, checks)
    return checks


def _subprocess_env(tmp: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LYNX_DUMP_DIR"}
    env["TRITON_INTERPRET"] = "1"
    # One thread per process: on a busy CPU, OpenMP threads that spin at barriers while a sibling is
    # descheduled make these small programs 5-20x slower. The programs compute the same either way.
    env.setdefault("OMP_NUM_THREADS", "1")
    if tmp is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor_cache")
    return env


def cli_help(subcommand: tuple[str, ...]) -> str:
    """``lynx-compile [SUBCOMMAND] --help``, in this process (lynx_compile.cli builds its parser in main)."""
    from lynx_compile import cli

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cli.main([*subcommand, "--help"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return f"<exit {exit_.code}>\n{out.getvalue()}"
    return out.getvalue()


def _selected(request, test_name: str) -> list[Block]:
    """The blocks of the selected (not deselected) parametrized runs of ``test_name`` in this module."""
    return [item.callspec.params["block"] for item in request.session.items
            if getattr(item, "originalname", None) == test_name and Path(str(item.fspath)) == Path(__file__)
            and hasattr(item, "callspec")]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    """Every subprocess the selected tests need, started together and run WORKERS at a time: the
    python blocks (each in an empty folder with its own Inductor cache) and the scripts' --help."""
    jobs = {}
    for block in _selected(request, "test_python_block_runs"):
        folder = tmp_path_factory.mktemp("block")
        (folder / "block.py").write_text(block.code)
        jobs[block.where] = (("block.py",), folder, _subprocess_env(folder))
    help_env = _subprocess_env(tmp_path_factory.mktemp("help"))
    for block in _selected(request, "test_bash_block_names_what_exists"):
        for argv, _, _ in checks_of(block).helps:
            if argv[:2] != ("-m", "lynx_compile"):
                jobs[argv] = (argv, REPO, help_env)

    def run(job):
        argv, cwd, env = job
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {key: pool.submit(run, job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def help_texts(runs) -> dict[tuple[str, ...], str]:
    """``--help`` of the scripts (from ``runs``) and of ``lynx-compile`` and its subcommands."""
    texts = {}
    for key, result in runs.items():
        if isinstance(key, tuple):
            output = result.stdout + result.stderr
            texts[key] = output if result.returncode == 0 else f"<exit {result.returncode}>\n{output}"
    texts[("-m", "lynx_compile", "--help")] = cli_help(())
    for block in BASH_BLOCKS:
        for argv, _, _ in checks_of(block).helps:
            if argv[:2] == ("-m", "lynx_compile"):
                texts[argv] = cli_help(argv[2:-1])
    return texts


# ---- the tests ------------------------------------------------------------------------------------
def test_documents_have_the_expected_blocks():
    assert (REPO / "docs").is_dir() and len(DOCUMENTS) > 1
    readme = [b for b in ALL_BLOCKS if b.path.name == "README.md"]
    assert sum(b.lang == "python" for b in readme) >= 3 and sum(b.lang == "bash" for b in readme) >= 2
    unknown = [f"{b.where}: ```{b.lang}" for b in ALL_BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, f"code blocks need one of the languages {sorted(LANGUAGES)}: {unknown}"


def test_fragments_are_few_and_still_parse():
    fragments = [b for b in ALL_BLOCKS if b.fragment]
    assert len(fragments) <= MAX_FRAGMENTS, [b.where for b in fragments]
    for block in fragments:
        if block.lang == "python":
            compile(block.code, block.where, "exec")


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if not b.fragment], ids=lambda b: b.where)
def test_python_block_runs(block: Block, runs):
    result = runs[block.where]
    assert result.returncode == 0, (f"{block.where}: the block exits {result.returncode}\n"
                                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.where)
def test_bash_block_names_what_exists(block: Block, help_texts):
    checks = checks_of(block)
    errors = [f"{block.where}: {error}" for error in checks.errors]
    subcommands = re.search(r"\{([\w,-]+)\}", help_texts[("-m", "lynx_compile", "--help")])
    assert subcommands, help_texts[("-m", "lynx_compile", "--help")]
    for name in checks.cli:
        if name not in subcommands[1].split(","):
            errors.append(f"{block.where}: lynx-compile has no subcommand {name!r} (it has {subcommands[1]})")
    for argv, flags, given_to in checks.helps:
        text = help_texts[argv]
        if text.startswith("<exit"):
            errors.append(f"{block.where}: {' '.join(argv)} fails:\n{text[-2000:]}")
            continue
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                errors.append(f"{block.where}: {given_to} does not accept {flag}")
    assert not errors, "\n".join(errors)


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def test_readme_keeps_ci_test_command():
    """CI (.ci/run) runs exactly the command of README.md's "Run the tests" section."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("### Run the tests") + 1
    end = next((i for i in range(start, len(lines)) if re.match(r"#{1,3} ", lines[i])), len(lines))
    blocks = [b for b in code_blocks(REPO / "README.md") if start < b.line <= end]
    assert blocks and blocks[0].lang == "bash" and blocks[0].code.strip() == TEST_COMMAND, blocks[:1]
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()


def test_links_stay_inside_the_repository_and_resolve():
    errors = []
    for doc in DOCUMENTS:
        for line, target in links(doc):
            where = f"{doc.relative_to(REPO)}:{line}: {target}"
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                if not target.startswith("https://"):
                    errors.append(f"{where}: only https links leave the repository")
                continue
            file_part, _, anchor = target.partition("#")
            if "../" in target or file_part.startswith("/") or "shared/" in target:
                errors.append(f"{where}: points outside the repository")
                continue
            destination = (doc.parent / file_part).resolve() if file_part else doc
            if not destination.is_relative_to(REPO) or not destination.exists():
                errors.append(f"{where}: no such file in the repository")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                errors.append(f"{where}: no heading #{anchor} in {destination.relative_to(REPO)}")
    assert not errors, "\n".join(errors)


def test_no_references_to_notes_users_do_not_have():
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in [*DOCUMENTS, REPO / "benchmarks" / "NOTES.md"]
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if any(note in line for note in PRIVATE_NOTES)]
    assert not found, "cite the paper or a public source instead:\n" + "\n".join(found)


def test_options_table_lists_every_option_briefly():
    from lynx_compile.config import LynxConfig, option_names

    rows = table_rows(section(REPO / "README.md", "## Options"))
    assert rows[0] == ["option", "default", "values", "meaning"]
    documented = [re.sub(r"`", "", row[0]) for row in rows[1:]]
    assert sorted(documented) == sorted(option_names(LynxConfig))
    long = {row[0]: len(row[3].split()) for row in rows[1:] if len(row[3].split()) > MAX_WORDS_PER_OPTION_CELL}
    assert not long, f"move the details to docs/options.md: {long}"


def test_no_table_cell_is_an_essay():
    long = [(doc.name, len(cell.split()), cell[:60]) for doc in DOCUMENTS for row in table_rows(prose(doc))
            for cell in row if len(cell.split()) > MAX_WORDS_PER_TABLE_CELL]
    assert not long, f"split these cells into paragraphs or lists: {long}"


def test_demo_flag_table_matches_the_demo():
    from lynx_compile import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    defaults = {action.option_strings[0]: action for action in parser._actions if action.option_strings}
    text = section(REPO / "docs" / "benchmarks.md", "## The demo: `python -m lynx_compile demo`")
    rows = {row[0]: row for row in table_rows(text)}
    compensation = defaults["--compensation"]
    assert rows["`--compensation`"][1] == f"`{compensation.default}`"
    assert tuple(re.findall(r"`(\w+)`", rows["`--compensation`"][2])) == tuple(compensation.choices) == demo.COMPENSATIONS
    for name, meaning in demo.COMPENSATION_HELP.items():
        assert re.search(rf"^- `{name}`( \(the default\))?: ", text, flags=re.M), f"no line for --compensation {name}"
    assert rows["`--pattern`"][1] == f"`{defaults['--pattern'].default}`"
    assert rows["`--device`"][1] == f"`{defaults['--device'].default}`"
    assert rows["`--images`, `--steps`"][1] == f"{defaults['--images'].default}, {defaults['--steps'].default}"
