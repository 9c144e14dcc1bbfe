"""The docs site (mkdocs.yml, docs/): the generated reference pages are current, every link of README.md and docs/
resolves, the strict MkDocs build passes and fails on what it guards, and the examples the pages show run as written."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from oirl.config import REPO_ROOT


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load("gen_config_reference", REPO_ROOT / "docs" / "gen_config_reference.py")
REGENERATE = "run `python docs/gen_config_reference.py` and commit docs/reference/"


# ---- the generated reference ---------------------------------------------------------------------------------


def test_the_committed_reference_pages_are_current():
    stale = GEN.stale_pages()
    assert not stale, f"{stale} differ from the code's docstrings and ranges; {REGENERATE}"


def test_a_stale_or_missing_reference_page_is_reported(tmp_path):
    for rel, text in GEN.pages().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert GEN.stale_pages(tmp_path) == []
    page = tmp_path / GEN.CONFIG_PAGE
    page.write_text(page.read_text().replace("| `rollout.num_engines` |", "| `rollout.engines` |"))
    assert GEN.stale_pages(tmp_path) == [str(GEN.CONFIG_PAGE)]
    (tmp_path / GEN.BATCH_PAGE).unlink()
    assert GEN.stale_pages(tmp_path) == [str(GEN.CONFIG_PAGE), str(GEN.BATCH_PAGE)]


SAMPLE = '''
from dataclasses import dataclass, field

from oirl.bounds import any_value, bounds


@dataclass(frozen=True)
class SampleConfig:
    steps: int = field(default=3, metadata=bounds(ge=1, why="one step at least"))
    """How many steps; see
    the second line."""
    scale: float = field(default=-0.5, metadata=any_value("negative: a penalty"))
    """A scale with a | pipe, a <tag>, 2*3*4 and `a|b <c>` in code."""
    frac: float = field(default=0.5, metadata=bounds(ge=0, lt=1))
    """A fraction."""
    name: str = "x"
    undocumented: bool = False
'''


def test_a_row_holds_the_fields_docstring_type_default_and_range(tmp_path, monkeypatch):
    (tmp_path / "sample_cfg.py").write_text(SAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from sample_cfg import SampleConfig

    rows = GEN._table(SampleConfig(), "s.")
    assert rows[2:] == [
        "| `s.steps` | int | `3` | >= 1 (one step at least) | How many steps; see the second line. |",
        "| `s.scale` | float | `-0.5` | any value (negative: a penalty) | "
        "A scale with a \\| pipe, a &lt;tag>, 2\\*3\\*4 and `a`\\|`b <c>` in code. |",
        "| `s.frac` | float | `0.5` | in [0, 1) | A fraction. |",
        '| `s.name` | str | `"x"` |  |  |',
        "| `s.undocumented` | bool | `false` |  |  |",
    ]


def test_the_reference_has_a_row_for_every_field_of_the_run():
    import dataclasses

    from oirl.config import RunConfig

    text = (REPO_ROOT / GEN.CONFIG_PAGE).read_text()
    run = RunConfig()
    sections = [("", run)] + [(f"{f.name}.", getattr(run, f.name)) for f in dataclasses.fields(run)
                              if dataclasses.is_dataclass(getattr(run, f.name))]
    names = [f"{prefix}{f.name}" for prefix, obj in sections for f in dataclasses.fields(obj)
             if not dataclasses.is_dataclass(getattr(obj, f.name))]
    assert len(names) > 100
    missing = [n for n in names if f"| `{n}` |" not in text]
    assert not missing, f"no row for {missing}; {REGENERATE}"


def test_the_batch_page_lists_every_column_of_the_schema():
    from oirl.batch import ROLLOUT_SCHEMA

    text = (REPO_ROOT / GEN.BATCH_PAGE).read_text()
    assert "list&lt;int32>" in text  # 'list<int32>' would be taken for an HTML tag and vanish
    missing = [name for name in ROLLOUT_SCHEMA.names if not re.search(rf"^\| {name}\s", text, re.M)]
    assert not missing


# ---- links ---------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)")


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """'page: target' for each relative link of a Markdown page whose file does not exist under root."""
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # code blocks show, not link
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = (page.parent / unquote(target.split("#")[0])).resolve()
            if not path.exists() or not path.is_relative_to(root.resolve()):
                broken.append(f"{page.relative_to(root)}: {target}")
    return broken


def test_every_link_of_the_readme_and_the_docs_points_to_a_file():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 10
    assert broken_links(pages, REPO_ROOT) == []


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "data.json").write_text("{}")
    page = tmp_path / "docs" / "p.md"
    page.write_text("[ok](../data.json) [web](https://example.org/x) [self](#top) `[code](nope.md)`\n"
                    "[gone](nope.md) ![pic](../results/none.png) [out](../../outside.md)\n"
                    "```\n[in a block](nope2.md)\n```\n")
    (tmp_path.parent / "outside.md").write_text("")
    assert broken_links([page], tmp_path) == ["docs/p.md: nope.md", "docs/p.md: ../results/none.png",
                                              "docs/p.md: ../../outside.md"]


# ---- the strict MkDocs build ---------------------------------------------------------------------------------


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site.parent)})


def test_the_docs_build_strict_and_the_site_holds_the_files_the_pages_cite(tmp_path):
    proc = build(REPO_ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = tmp_path / "site"
    assert "rollout.num_engines" in (site / "reference" / "config" / "index.html").read_text()
    demo = site / "_repo" / "benchmarks" / "results" / "demo.json"
    assert demo.read_bytes() == (REPO_ROOT / "benchmarks" / "results" / "demo.json").read_bytes()
    assert 'src="../_repo/benchmarks/results/demo_curves.png"' in (site / "benchmarks" / "index.html").read_text()


@pytest.fixture
def docs_copy(tmp_path):
    """mkdocs.yml, docs/ and the benchmark files the pages link to, copied: a tree a test may break."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "mkdocs.yml", root)
    shutil.copytree(REPO_ROOT / "benchmarks" / "results", root / "benchmarks" / "results")
    shutil.copy(REPO_ROOT / "benchmarks" / "README.md", root / "benchmarks")
    return root


@pytest.mark.parametrize("page, text, fragment", [
    ("concepts.md", "[a page](no-such-page.md)", "no-such-page.md"),
    ("concepts.md", "[an anchor](checks.md#no-such-section)", "no-such-section"),
    ("concepts.md", "[a result](../benchmarks/results/no_such.json)", "benchmarks/results/no_such.json"),
    ("orphan.md", "# A page nobody listed in nav", "orphan.md"),
])
def test_the_strict_build_fails_on_a_broken_link_or_a_page_left_out(docs_copy, tmp_path, page, text, fragment):
    assert build(docs_copy, tmp_path / "ok").returncode == 0
    path = docs_copy / "docs" / page
    path.write_text((path.read_text() if path.exists() else "") + f"\n{text}\n")
    proc = build(docs_copy, tmp_path / "broken")
    assert proc.returncode != 0
    assert fragment in proc.stdout + proc.stderr


# ---- examples the pages show ---------------------------------------------------------------------------------


def python_block(page: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in ``page``."""
    return page.read_text().split(heading)[1].split("```python")[1].split("```")[0]


def test_the_reward_function_example_runs_on_the_reward_actor(tmp_path, monkeypatch, tiny_model_path):
    from reward_server.reward_worker import RewardConfig, RewardWorker

    code = python_block(REPO_ROOT / "docs" / "writing.md", "## Writing a reward function")
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    worker = RewardWorker(RewardConfig(kind="none", function="my_rewards:brevity"), tiny_model_path)
    rewards = worker.score_texts(["q"] * 3, ["It is 72.", "It is 71.", "72 " + "and more " * 30], ["72"] * 3)
    assert rewards.tolist() == [1.0, 0.0, 0.0]
