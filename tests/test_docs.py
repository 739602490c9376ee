"""The README and docs/ cannot rot: links resolve, documented commands parse, a few run for real.

- every link from README.md or docs/*.md to a repository file (and heading) resolves;
- every ``strataprune ...`` line of a ```bash block parses with the real argument parser, and every
  ``--set key=value`` / ``--allocators name:key=value`` key exists in the recipe schema or the plugin's Config;
- every ``strataprune.x.y`` name and ``strataprune/...`` path the docs mention still exists;
- every ``algorithms.md §N`` cited anywhere names a section of docs/algorithms.md;
- nothing points outside the repository or to a tracker's issue numbers;
- the plugin guide's allocator passes ``check_allocator``;
- blocks marked ``<!-- doc-test: run -->`` run, command by command, on a tiny random model (slow).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARKER = "<!-- doc-test: run -->"


@dataclasses.dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    runnable: bool


def _split(doc: Path) -> tuple[list[Block], str]:
    """Fenced code blocks of a Markdown file, and its prose (code blocks blanked out, lines kept)."""
    blocks: list[Block] = []
    prose: list[str] = []
    lines = doc.read_text(encoding="utf-8").split("\n")
    fence: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = (number, stripped[3:].strip().lower())
            body = []
            prose.append("")
        elif fence is not None and stripped.startswith("```"):
            previous = [candidate for candidate in lines[: fence[0] - 1] if candidate.strip()]
            runnable = bool(previous) and previous[-1].strip() == RUN_MARKER
            blocks.append(Block(doc, fence[0], fence[1], "\n".join(body), runnable))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{doc.name}:{fence[0]}: code block never closed"
    return blocks, "\n".join(prose)


def _where(doc: Path, line: int) -> str:
    return f"{doc.relative_to(ROOT)}:{line}"


# --------------------------------------------------------------------------- (a) links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    _blocks, prose = _split(doc)
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose.split("\n"):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_every_link_to_a_repository_file_or_heading_resolves() -> None:
    broken: list[str] = []
    checked = 0
    for doc in DOCS:
        _blocks, prose = _split(doc)
        for number, line in enumerate(prose.split("\n"), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                path_part, _, anchor = target.partition("#")
                resolved = (doc.parent / path_part).resolve() if path_part else doc
                checked += 1
                if not resolved.is_relative_to(ROOT):
                    broken.append(f"{_where(doc, number)}: {target} leaves the repository")
                elif not resolved.exists():
                    broken.append(f"{_where(doc, number)}: {target} does not exist")
                elif anchor and (resolved.suffix != ".md" or anchor not in _anchors(resolved)):
                    broken.append(f"{_where(doc, number)}: {target}: no heading with anchor '#{anchor}'")
    assert checked > 50, f"only {checked} links found: is the parser broken?"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_github_slug_matches_githubs_rule() -> None:
    heading = "Text protocols: the papers' WikiText-2 and C4, exactly"
    assert github_slug(heading) == "text-protocols-the-papers-wikitext-2-and-c4-exactly"
    assert github_slug("2.3 SparseGPT") == "23-sparsegpt"
    assert github_slug("Comparing allocators: `strataprune allocate`") == "comparing-allocators-strataprune-allocate"


# --------------------------------------------------------------------------- (b) commands parse
def _command_lines(block: Block) -> list[tuple[int, list[str]]]:
    """Shell words of each command of a bash block (continuations joined, comments and env assignments dropped)."""
    out: list[tuple[int, list[str]]] = []
    pending, start = "", 0
    for offset, line in enumerate(block.text.split("\n"), 1):
        if not pending:
            start = block.line + offset
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: a multi-line python -c "..."
            pending += "\n"
            continue
        pending = ""
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            out.append((start, words))
    assert not pending, f"{_where(block.doc, start)}: unterminated command"
    return out


def _doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        blocks, _prose = _split(doc)
        for block in blocks:
            if block.lang in ("bash", "sh", "shell"):
                for line, words in _command_lines(block):
                    if words[0] == "strataprune":
                        found.append((_where(doc, line), words[1:]))
    return found


def _example_plugins() -> dict[str, type]:
    """The example plugin the docs use (examples/strataprune-example-plugin), whether installed or not."""
    sys.path.insert(0, str(ROOT / "examples" / "strataprune-example-plugin"))
    try:
        import strataprune_example_plugin as example
    finally:
        sys.path.pop(0)
    return {example.DepthRamp.name: example.DepthRamp}


def _config_fields(kind: str, name: str) -> set[str]:
    from strataprune import get_registry

    registry = get_registry()
    cls = registry.get(kind, name) if name in registry.names(kind) or name not in _example_plugins() else _example_plugins()[name]
    config = getattr(cls, "Config", None)
    return {f.name for f in dataclasses.fields(config)} if config is not None else set()


def _schema_problems(args: object) -> list[str]:
    """--set keys and --allocators parameters that the recipe schema or the plugin's Config does not have."""
    from strataprune import Recipe

    recipe = Recipe()
    problems: list[str] = []
    for item in getattr(args, "set", None) or []:
        key = item.partition("=")[0].strip()
        parts = key.split(".")
        top = {f.name for f in dataclasses.fields(Recipe)}
        if parts[0] not in top:
            problems.append(f"--set {key}: '{parts[0]}' is not a recipe key")
        elif parts[0] in ("model", "calibration", "evaluation"):
            fields = {f.name for f in dataclasses.fields(getattr(recipe, parts[0]))}
            if len(parts) < 2 or parts[1] not in fields:
                problems.append(f"--set {key}: not a key of the recipe's {parts[0]} section")
        elif parts[0] in ("allocator", "pruner", "recovery") and len(parts) > 1:
            choice = getattr(args, parts[0], None)
            if choice is None:
                default = getattr(recipe, parts[0])
                choice = default.name if default is not None else None
            if choice is None:
                problems.append(f"--set {key}: no {parts[0]} chosen")
            elif parts[1] not in _config_fields(parts[0], choice):
                problems.append(f"--set {key}: {parts[0]} '{choice}' has no parameter '{parts[1]}'")
    for spec in (getattr(args, "allocators", None) or "").split(","):
        name, *pairs = spec.split(":")
        if not name:
            continue
        fields = _config_fields("allocator", name)
        for pair in pairs:
            param = pair.partition("=")[0]
            if param not in fields:
                problems.append(f"--allocators {spec}: allocator '{name}' has no parameter '{param}'")
    return problems


def test_every_documented_strataprune_command_parses() -> None:
    from strataprune.cli import make_parser

    commands = _doc_commands()
    assert len(commands) > 40, f"only {len(commands)} strataprune commands found in ```bash blocks"
    failures: list[str] = []
    for where, argv in commands:
        try:
            args = make_parser().parse_args(argv)
        except BaseException as exc:  # noqa: BLE001 - ConfigError or SystemExit: report every line at once
            failures.append(f"{where}: strataprune {shlex.join(argv)}\n    {type(exc).__name__}: {exc}")
            continue
        failures += [f"{where}: {problem}" for problem in _schema_problems(args)]
    assert not failures, "documented commands that the parser or the recipe schema rejects:\n" + "\n".join(failures)


def test_schema_check_catches_a_misspelt_key() -> None:
    from strataprune.cli import make_parser

    good = make_parser().parse_args(
        ["run", "--allocator", "atp", "--set", "allocator.max_trials=3", "--set", "evaluation.max_windows=null"]
    )
    assert _schema_problems(good) == []
    bad = make_parser().parse_args(
        ["run", "--allocator", "atp", "--set", "allocator.max_trial=3", "--set", "evaluation.windows=2"]
    )
    assert len(_schema_problems(bad)) == 2


# --------------------------------------------------------------------------- names and paths the docs mention
DOTTED = re.compile(r"(?<![\w./])strataprune(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"(?<![\w./-])((?:strataprune|benchmarks|tests|examples|docs)/[\w./*-]*[\w/*])")


def _module_prefix(dotted: str) -> int:
    parts = dotted.split(".")
    for size in range(len(parts), 0, -1):
        try:
            if importlib.util.find_spec(".".join(parts[:size])) is not None:
                return size
        except (ModuleNotFoundError, ValueError):
            continue
    return 0


def test_every_module_and_path_the_docs_name_exists() -> None:
    missing: list[str] = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").split("\n"), 1):
            for dotted in set(DOTTED.findall(line)):
                parts = dotted.split(".")
                if len(parts) - _module_prefix(dotted) > 1:  # module.attribute is fine; a missing module is not
                    missing.append(f"{_where(doc, number)}: {dotted}")
            for match in REPO_PATH.finditer(line):
                path = match.group(1)
                if path.endswith(".so"):  # built in place, git-ignored
                    continue
                if line[match.end() : match.end() + 1] in ("<", "{", ".", "-"):  # results-<timestamp>.md, name.{json,md}
                    path += "*"
                if not list(ROOT.glob(path.rstrip("/"))):
                    missing.append(f"{_where(doc, number)}: {path}")
    assert not missing, "names or paths in the docs that do not exist:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- algorithms.md sections
def test_every_cited_algorithms_section_exists() -> None:
    text = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.MULTILINE))
    assert {"1", "2.3", "6.2", "9", "10.4"} <= sections
    missing: list[str] = []
    files = [*DOCS, *ROOT.glob("strataprune/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("tests/*.py")]
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if "algorithms" in line and path.name != "test_docs.py":
                cited = re.findall(r"§\s?(\d+(?:\.\d+)?)", line)
                missing += [f"{_where(path, number)}: §{s}" for s in cited if s not in sections]
    assert not missing, "sections cited but absent from docs/algorithms.md:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- (c) nothing outside the repository
OUTSIDE = re.compile(
    r"\.\./shared|/work/"  # files outside the repository
    r"|\bissues? ?#?\d+|\b[\w.-]+/[\w.-]+#\d+(?![\w-])|(?<![\w(/])#\d+\b(?![\w-])",  # issue numbers: issue 18, owner/repo#31, #12
    re.IGNORECASE,
)


def _offenders(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            for match in OUTSIDE.finditer(line):
                found.append(f"{_where(path, number)}: {match.group(0)!r}")
    return found


def test_docs_point_nowhere_outside_the_repository_nor_to_issue_numbers() -> None:
    offenders = _offenders(DOCS)
    assert not offenders, "README/docs mention files outside the repository or issue numbers:\n" + "\n".join(offenders)


def test_code_points_nowhere_outside_the_repository_nor_to_issue_numbers() -> None:
    here = Path(__file__).resolve()  # this file spells the patterns out
    paths = sorted([*ROOT.glob("strataprune/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("tests/**/*.py")])
    offenders = _offenders([p for p in paths if p.resolve() != here])
    assert not offenders, "code mentions files outside the repository or issue numbers:\n" + "\n".join(offenders)


def test_the_outside_pattern_catches_what_it_must() -> None:
    for bad in ("see ../shared/data/x", "/work/shared/data", "fixed in issue 18", "issue #12", "locuslab/wanda#31"):
        assert OUTSIDE.search(bad), bad
    for fine in ("[pruners.md](pruners.md#n-m-sparsity)", "algorithms.md §10.4", "(docs/algorithms.md#10-reference-numbers)"):
        assert not OUTSIDE.search(fine), fine


# --------------------------------------------------------------------------- the plugin guide's code
def test_the_plugin_guide_allocator_passes_the_contract_checks() -> None:
    from strataprune.testing import check_allocator

    blocks, _prose = _split(ROOT / "docs" / "writing-a-plugin.md")
    code = next(block.text for block in blocks if block.lang == "python" and "class DepthRamp" in block.text)
    namespace: dict[str, object] = {}
    exec(compile(code, "writing-a-plugin.md", "exec"), namespace)  # noqa: S102 - our own documentation
    check_allocator(namespace["DepthRamp"])
    check_allocator((namespace["DepthRamp"], {"spread": 0.2}))


# --------------------------------------------------------------------------- (d) runnable blocks
def _runnable() -> list[Block]:
    out = []
    for doc in DOCS:
        blocks, _prose = _split(doc)
        out += [block for block in blocks if block.runnable]
    return out


def test_some_blocks_are_marked_runnable() -> None:
    blocks = _runnable()
    assert blocks and all(block.lang == "bash" for block in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("block", _runnable(), ids=lambda block: _where(block.doc, block.line))
def test_runnable_doc_blocks_run(block: Block, tmp_path: Path) -> None:
    for shipped in ("LICENSE", "README.md"):
        (tmp_path / shipped).symlink_to(ROOT / shipped)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    for line, words in _command_lines(block):
        program = {"strataprune": [sys.executable, "-m", "strataprune"], "python": [sys.executable]}.get(words[0])
        assert program is not None, f"{_where(block.doc, line)}: a runnable block may only call strataprune or python"
        command = [*program, *words[1:]]
        done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        where = _where(block.doc, line)
        assert done.returncode == 0, f"{where}: {shlex.join(words)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        if words[:2] == ["strataprune", "eval"]:
            assert "perplexity" in done.stdout
        if words[:2] == ["strataprune", "run"]:
            output = words[words.index("--output") + 1]
            assert (tmp_path / output / "model.safetensors").exists() and (tmp_path / output / "report.json").exists()
