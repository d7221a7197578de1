"""The docs hold together: every cited anchor exists, every relative link resolves, the README stays short.

Code, configs and docs cite the documentation as ``docs/<file>.md#<anchor>`` (e.g. a divergence entry of
the algorithm page), and the markdown files link to each other. A renamed heading or a moved section
must fail here, naming the citing file and line, instead of leaving a dead pointer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# Where citations of the docs may live (besides README.md and docs/ themselves).
CODE_DIRS = ("smat_dist", "tools", "configs", "cluster", "tests")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}

# `docs/<file>.md` or `docs/<file>.md#<anchor>`, rooted at the repository (not preceded by a path part).
DOC_CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
# [text](target) and ![alt](target), with an optional "title".
MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MD_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXPLICIT_ANCHOR = re.compile(r"<[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _strip_fences(text: str) -> List[Tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * len(mark)
            elif mark.startswith(fence):
                fence = None
            continue
        if fence is None:
            out.append((no, line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text only, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Explicit ``<a id=...>`` / ``id="..."`` anchors and GitHub heading slugs (with -1, -2 for repeats)."""
    text = path.read_text(encoding="utf-8")
    found = set(EXPLICIT_ANCHOR.findall(text))
    seen: Dict[str, int] = {}
    for _, line in _strip_fences(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def _text_files(root: Path) -> Iterator[Path]:
    for name in CODE_DIRS:
        base = root / name
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts):
                yield p


def _markdown_files(root: Path) -> List[Path]:
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted((root / "docs").glob("*.md"))


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary or unreadable: holds no citations


def check_docs(root: Path = REPO) -> List[str]:
    """Every problem as ``citing_file:line: target: what is wrong``; empty when the docs hold together.

    Checks (a) ``docs/<file>.md#<anchor>`` citations in code, README and docs (in README and docs also
    without an anchor): the file exists and has the anchor; (b) relative markdown links in README and docs/ (``algorithm.md#d9-...``,
    ``../README.md``, ``#local``): the file exists and, for a markdown target, has the anchor.
    """
    cache: Dict[Path, Set[str]] = {}

    def has_anchor(doc: Path, anchor: str) -> bool:
        if doc not in cache:
            cache[doc] = anchors(doc)
        return anchor in cache[doc]

    errors: List[str] = []

    def check(citing: Path, no: int, shown: str, target: Path, anchor: Optional[str]) -> None:
        where = f"{citing.relative_to(root)}:{no}: {shown}"
        if not target.exists():
            errors.append(f"{where}: {target.relative_to(root) if target.is_relative_to(root) else target} does not exist")
        elif anchor and target.suffix == ".md" and not has_anchor(target, anchor):
            errors.append(f"{where}: no anchor '{anchor}' in {target.relative_to(root)}")

    md_files = _markdown_files(root)
    for path in [*_text_files(root), *md_files]:
        text = _read(path)
        if text is None:
            continue
        in_code = path not in md_files  # code names docs paths in other roles too; only anchored ones cite
        for no, line in enumerate(text.splitlines(), 1):
            for m in DOC_CITATION.finditer(line):
                if m.group(2) or not in_code:
                    check(path, no, m.group(0), root / "docs" / m.group(1), m.group(2))

    for path in md_files:
        for no, line in _strip_fences(path.read_text(encoding="utf-8")):
            line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
            targets = MD_LINK.findall(line)
            ref = MD_REF_DEF.match(line)
            if ref:
                targets.append(ref.group(1))
            for target in targets:
                if EXTERNAL.match(target) or target.startswith("/"):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                check(path, no, target, dest, anchor or None)
    return list(dict.fromkeys(errors))  # a README link into docs/ is also a citation: report it once


# ------------------------------------------------------------------------------------------ the repository
def test_every_docs_anchor_and_relative_link_resolves():
    errors = check_docs(REPO)
    assert not errors, "broken documentation references:\n" + "\n".join(errors)


def test_readme_is_a_short_front_door():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it <= {README_MAX_LINES} and move detail to docs/"


def test_every_divergence_has_one_explicit_anchor():
    """D1..D21 are cited by explicit anchors (``<a id="dN-topic">``), which do not move with heading text."""
    explicit = EXPLICIT_ANCHOR.findall((REPO / "docs" / "algorithm.md").read_text(encoding="utf-8"))
    numbers = [int(m.group(1)) for a in explicit if (m := re.fullmatch(r"d(\d+)-[a-z0-9-]+", a))]
    assert sorted(numbers) == list(range(1, 22)), f"want one d<N>-<topic> anchor for each of D1..D21, got {numbers}"


# ------------------------------------------------------------------------------------------ the checker
def _tree(tmp_path: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return tmp_path


# Built by concatenation so this file holds no citation the repository check would resolve.
D = "docs" + "/"


def test_checker_accepts_explicit_anchors_heading_slugs_and_relative_links(tmp_path):
    root = _tree(tmp_path, {
        "README.md": f"See [the math]({D}algo.md#d9-fine-tuning) and [data]({D}data.md#layout-and-keys).\n",
        "docs/algo.md": '# Algo\n\n<a id="d9-fine-tuning"></a>\n### D9. Fine-tuning\n\n## Why it is `fast` (really)\n'
                        "See [data](data.md) and [here](#why-it-is-fast-really) and [top](../README.md).\n",
        "docs/data.md": "# Data\n\n## Layout and keys\n\n```\n[not a link](nowhere.md)\n# not a heading\n```\n",
        "smat_dist/mod.py": f"# {D}algo.md#d9-fine-tuning explains why\n",
    })
    assert check_docs(root) == []
    assert {"algo", "d9-fine-tuning", "why-it-is-fast-really"} <= anchors(root / "docs" / "algo.md")
    assert "not-a-heading" not in anchors(root / "docs" / "data.md")


def test_checker_names_the_citing_line_and_the_missing_target(tmp_path):
    root = _tree(tmp_path, {
        "README.md": "# R\n\nSee [gone](docs/missing.md).\n",
        "docs/algo.md": "# Algo\n\n## Heading\n\nSee [x](data.md#nope) and [y](#heading) and [z](#absent).\n",
        "docs/data.md": "# Data\n",
        "smat_dist/mod.py": f"x = 1\n# {D}algo.md#d1-gate-noise\n",
        "configs/run.yaml": f"# {D}nothing.md#a\n",
    })
    errors = check_docs(root)
    assert sorted(errors) == sorted([
        "README.md:3: docs/missing.md: docs/missing.md does not exist",
        "docs/algo.md:5: data.md#nope: no anchor 'nope' in docs/data.md",
        "docs/algo.md:5: #absent: no anchor 'absent' in docs/algo.md",
        f"smat_dist/mod.py:2: {D}algo.md#d1-gate-noise: no anchor 'd1-gate-noise' in docs/algo.md",
        f"configs/run.yaml:1: {D}nothing.md#a: docs/nothing.md does not exist",
    ])


def test_repeated_headings_get_numbered_slugs(tmp_path):
    root = _tree(tmp_path, {"docs/a.md": "# A\n## Outputs\n## Outputs\n"})
    assert {"a", "outputs", "outputs-1"} == anchors(root / "docs" / "a.md")


# ------------------------------------------------------------------------------------------ module paths
# `smat_dist.train.launch`, `smat_dist.smat.SMAT` (a module, then maybe a name in it) and `smat_dist/x/y.py`.
DOTTED_MODULE = re.compile(r"(?<![\w./-])smat_dist(?:\.[A-Za-z_]\w*)+")
MODULE_FILE = re.compile(r"(?<![\w./-])smat_dist/[\w/]+\.py\b")
DOCSTRING_DIRS = ("smat_dist", "tools")


def _module_names(source: Path) -> Set[str]:
    """The names a module defines at its top level, including lazily exported ones (``_lazy.lazy_exports``)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names: Set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    lazy = any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "lazy_exports" for n in ast.walk(tree))
    if lazy:  # lazy_exports(__name__, {"Name": "submodule", ...}), the mapping inline or in a variable
        names |= {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys
                  if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return names


def module_path_problem(root: Path, dotted: str) -> Optional[str]:
    """Why ``smat_dist.a.b[.Name]`` names nothing in ``root`` (None when it does): the longest prefix must be
    a module or package of the tree and what follows a name defined in it."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:i])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            if i == len(parts) or parts[i] in _module_names(source):
                return None
            return f"no module {'.'.join(parts[:i + 1])} and no name {parts[i]} in {'.'.join(parts[:i])}"
    return "no such package"


def _docstrings(path: Path) -> Iterator[Tuple[int, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield (node.body[0].lineno, doc)


def check_module_paths(root: Path = REPO) -> List[str]:
    """Every ``smat_dist.x.y`` module path and ``smat_dist/...py`` file named in README.md, docs/*.md and the
    docstrings of the package and tools that does not exist, as ``file:line: name: why``."""
    texts: List[Tuple[str, str]] = [(str(p.relative_to(root)), _read(p) or "") for p in _markdown_files(root)]
    for name in DOCSTRING_DIRS:
        for path in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else []:
            if not SKIP_DIRS & set(path.parts):
                texts += [(f"{path.relative_to(root)}:{no}", doc) for no, doc in _docstrings(path)]
    errors: List[str] = []
    for where, text in texts:
        for no, line in enumerate(text.splitlines(), 1):
            place = f"{where}:{no}" if ":" not in where else where
            for m in DOTTED_MODULE.finditer(line):
                why = module_path_problem(root, m.group(0))
                if why:
                    errors.append(f"{place}: {m.group(0)}: {why}")
            for m in MODULE_FILE.finditer(line):
                if not (root / m.group(0)).is_file():
                    errors.append(f"{place}: {m.group(0)}: no such file")
    return list(dict.fromkeys(errors))


def test_every_module_path_named_in_docs_and_docstrings_exists():
    errors = check_module_paths(REPO)
    assert not errors, "names of modules that do not exist:\n" + "\n".join(errors)


def test_module_path_checker_finds_stale_names(tmp_path):
    root = _tree(tmp_path, {
        "smat_dist/__init__.py": "",
        "smat_dist/train/__init__.py": '"""Launchers: :mod:`smat_dist.train.launch`, :mod:`smat_dist.train.ray`."""\n',
        "smat_dist/train/launch.py": "from x import y as Runtime\n\n\ndef run():\n    pass\n",
        "smat_dist/smat/__init__.py": 'lazy_exports(__name__, {"SMAT": "meta_arch"})\n',
        "README.md": "Run `smat_dist.train.launch.run` or `smat_dist.smat.SMAT`; see `smat_dist/train/worker.py`\n"
                     "and `smat_dist/train/launch.py`, `smat_dist.train.launch.Runtime`, `smat_dist.nope`.\n",
    })
    assert sorted(check_module_paths(root)) == sorted([
        "README.md:1: smat_dist/train/worker.py: no such file",
        "README.md:2: smat_dist.nope: no module smat_dist.nope and no name nope in smat_dist",
        "smat_dist/train/__init__.py:1: smat_dist.train.ray: no module smat_dist.train.ray and no name ray in "
        "smat_dist.train",
    ])
