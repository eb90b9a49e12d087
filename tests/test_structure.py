"""The package's shape (docs/design.md#modules): imports run one way, and no source is special-cased below it.

Every ``raybench`` import of every module is read with ``ast`` (function-level imports included, since a lazy
import is still a dependency), and each module may import only modules of a lower layer or of its own package.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raybench"

LAYERS = [
    {"ids", "spec", "versions"},  # primitives: digests, parameter specs, package versions
    {"metrics", "models", "data", "store"},  # the bottom proper
    {"training", "field_metrics"},  # above the bottom, below reduce (whose rows field_metrics fills)
    {"methods"},
    {"config"},
    {"plan"},
    {"sources", "units", "reduce", "report", "subsets"},
    {"engine", "score", "convergence", "compare"},
    {"selection"},  # subsamples as convergence does, scores as reduce does
    {"pipeline"},
    {"cli", "__init__"},
    {"__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    """Every raybench module ``path`` imports at run time (imports under ``if TYPE_CHECKING:`` are for type hints
    only and are skipped)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raybench"):
            if node.module == "raybench":  # from raybench import training: the submodules named
                found.update(f"raybench.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):  # a bare ``import raybench`` reads ``__version__``, importing nothing
            found.update(a.name for a in node.names if a.name.startswith("raybench."))
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def test_every_module_is_in_a_layer():
    assert {_top(m) for m in _modules()} <= set(RANK)


def test_imports_run_one_way():
    upward = []
    for module, path in _modules().items():
        mine = _top(module)
        for imported in _imports(path):
            theirs = _top(imported) if imported != "raybench" else "__init__"
            if theirs not in RANK or theirs == mine:
                continue
            if RANK[theirs] >= RANK[mine]:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_the_layers_below_the_sources_name_no_source():
    # a published source is one module behind the source contract, not a case of the config, plan or engine
    for path in [PACKAGE / "config.py", PACKAGE / "plan.py", *sorted((PACKAGE / "engine").glob("*.py"))]:
        assert "easydub" not in path.read_text().lower(), path
        assert "klom_models" not in path.read_text().lower(), path


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "store.py"
    bad.write_text("from raybench.plan import Unit\n")
    assert _imports(bad) == {"raybench.plan"} and RANK[_top("raybench.plan")] > RANK[_top("raybench.store")]
