"""Structure of the package (static checks, no process groups).

* No import cycle among ``flashoverlap``'s modules at import time: the graph of module-level
  imports (``from .x import y``, ``from flashoverlap.x import y``, ``import flashoverlap.x``,
  relative imports resolved; ``if TYPE_CHECKING:`` blocks excluded) is acyclic.  Imports
  inside functions run later and may close a cycle on purpose (lazy GPU imports, the policy
  calling the tuner); those cycles are listed (``pytest -s``), not failed on.
* Nothing outside :mod:`flashoverlap.collectives` branches on which collective runs: no
  ``op ==`` / ``op !=`` comparison, no ``"all_reduce"`` / ``"reduce_scatter"`` string literal in
  code, no comparison or ``isinstance`` against the built-in collectives (an allow-list names
  each exception and why).
* ``import flashoverlap`` registers ``torch.ops.flashoverlap.gemm_collective`` and exports the
  public names.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flashoverlap"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """``(node, at_module_level)`` for every import statement, skipping TYPE_CHECKING
    blocks; class bodies run at import time and count as module level."""
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub, in_function)
                continue
            visit_stmt(child, in_function)

    def visit_stmt(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append((child, not in_function))
        nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
        visit(child, nested)

    visit(tree, False)
    return out


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> set[str]:
    """flashoverlap modules an import statement makes Python execute (the deepest named
    module: ``from .engine import run_overlap`` needs ``flashoverlap.engine``; ``from . import
    collectives`` needs ``flashoverlap.collectives``)."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "flashoverlap" or alias.name.startswith("flashoverlap."):
                found.add(alias.name)
        return found & known
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
        if not (target == "flashoverlap" or target.startswith("flashoverlap.")):
            return found
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.add(sub if sub in known else target)
    return found & known


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(module-level edges, all edges)`` between flashoverlap modules."""
    mods = _modules()
    known = set(mods)
    top: dict[str, set[str]] = {m: set() for m in mods}
    every: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, at_top in _imports(tree):
            targets = _targets(module, is_package, node, known) - {module}
            every[module] |= targets
            if at_top:
                top[module] |= targets
    return top, every


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(result)


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (for the message)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}

    def walk(v: str) -> bool:
        for w in sorted(graph[v] & members):
            if w == start:
                return True
            if w not in seen:
                seen.add(w)
                path.append(w)
                if walk(w):
                    return True
                path.pop()
        return False

    walk(start)
    return path + [start]


def test_the_import_graph_is_resolved():
    top, every = _graphs()
    # spot checks of the resolver: relative, parent-relative, package and absolute forms
    assert "flashoverlap.collectives" in top["flashoverlap.plan"]  # from . import collectives
    assert "flashoverlap.plan" in top["flashoverlap.engine.reference"]  # from ..plan import
    assert "flashoverlap.collectives.base" in top["flashoverlap.collectives.all_reduce"]
    assert "flashoverlap.library_ops" in top["flashoverlap"]
    assert "flashoverlap.agreement" in every["flashoverlap.ops"]  # lazily, inside _validate
    assert "flashoverlap.agreement" not in top["flashoverlap.ops"]
    assert "flashoverlap.kernels" in top["flashoverlap.kernels.signal_gemm"]  # absolute form


def test_no_import_cycle_at_module_level():
    top, _ = _graphs()
    cycles = _cycles(top)
    assert not cycles, "module-level import cycles: " + "; ".join(
        " -> ".join(_a_cycle(top, c)) for c in cycles)


def test_report_function_level_cycles(capsys):
    """Cycles closed only by imports inside functions (deliberate lazy imports): listed."""
    top, every = _graphs()
    cycles = _cycles(every)
    with capsys.disabled():
        print(f"\nfunction-level import cycles ({len(cycles)}):")
        for c in cycles:
            print("  component:", ", ".join(c))
            print("    e.g.", " -> ".join(_a_cycle(every, c)))
    assert not _cycles(top)


# ------------------------------------------------------------------ no branching on collectives
BUILTIN_NAMES = ("all_reduce", "reduce_scatter")
BUILTIN_OBJECTS = {"ALL_REDUCE", "REDUCE_SCATTER", "AllReduce", "ReduceScatter"}

# (path relative to the repo, kind) -> why it is fine.  Kinds: "docstring" (prose naming the
# registered names), "literal" (a string in code), "op-compare", "builtin-compare".
ALLOWED = {
    ("flashoverlap/library_ops.py", "docstring"):
        "the op schema's docstring names the built-in collectives' registered names",
}


def _docstring_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _names_in(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, (ast.Name, ast.Attribute))}


def _hits(path: Path) -> list[tuple[str, int, str]]:
    """``(kind, line, text)`` of every way the module could branch on a collective."""
    src = path.read_text()
    tree = ast.parse(src)
    lines = src.splitlines()
    doc = _docstring_lines(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in BUILTIN_NAMES and node.lineno not in doc:
                hits.append(("literal", node.lineno, lines[node.lineno - 1].strip()))
        if isinstance(node, ast.Compare) and _names_in(node) & BUILTIN_OBJECTS:
            hits.append(("builtin-compare", node.lineno, lines[node.lineno - 1].strip()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("isinstance", "issubclass") \
                and _names_in(node) & BUILTIN_OBJECTS:
            hits.append(("builtin-compare", node.lineno, lines[node.lineno - 1].strip()))
    for lineno in sorted(doc):
        if any(f'"{n}"' in lines[lineno - 1] or f"'{n}'" in lines[lineno - 1]
               for n in BUILTIN_NAMES):
            hits.append(("docstring", lineno, lines[lineno - 1].strip()))
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(src).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
                                tokenize.INDENT, tokenize.DEDENT)]
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.string == "op":
            after = tokens[i + 1].string if i + 1 < len(tokens) else ""
            before = tokens[i - 1].string if i else ""
            if after in ("==", "!=") or before in ("==", "!="):
                hits.append(("op-compare", tok.start[0], lines[tok.start[0] - 1].strip()))
    return hits


def _scanned() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if (PACKAGE / "collectives") not in p.parents]


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Doc: "all_reduce"."""\n'
                      'def f(problem, c):\n'
                      '    if problem.op == "reduce_scatter":\n'
                      '        return isinstance(c, AllReduce) or c is REDUCE_SCATTER\n'
                      '    return "x" != op\n')
    kinds = sorted(kind for kind, _, _ in _hits(sample))
    assert kinds == ["builtin-compare", "builtin-compare", "docstring", "literal",
                     "op-compare", "op-compare"]


def test_nothing_outside_collectives_branches_on_the_collective(capsys):
    found = []
    for path in _scanned():
        rel = path.relative_to(ROOT).as_posix()
        for kind, lineno, text in _hits(path):
            found.append((rel, kind, lineno, text))
    with capsys.disabled():
        print(f"\ncollective-name hits outside flashoverlap/collectives ({len(found)}):")
        for rel, kind, lineno, text in found:
            reason = ALLOWED.get((rel, kind), "NOT ALLOWED")
            print(f"  {rel}:{lineno} [{kind}] {text[:80]}  -- {reason}")
    bad = [f"{rel}:{lineno} [{kind}] {text}" for rel, kind, lineno, text in found
           if (rel, kind) not in ALLOWED]
    assert not bad, "branching on a collective outside flashoverlap/collectives:\n" + \
        "\n".join(bad)


# ------------------------------------------------------------------ import side effects
def test_import_registers_the_op_and_exports_the_api():
    code = (
        "import torch\n"
        "try:\n"
        "    torch.ops.flashoverlap.gemm_collective\n"
        "except (AttributeError, RuntimeError):\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('registered before import flashoverlap')\n"
        "import flashoverlap\n"
        "op = torch.ops.flashoverlap.gemm_collective\n"
        "schema = str(op.default._schema)\n"
        "assert 'Tensor? residual' in schema and 'str collective' in schema, schema\n"
        "names = set(dir(flashoverlap))\n"
        "need = {'RowParallelLinear', 'patch_tensor_parallel', 'unpatch_tensor_parallel',\n"
        "        'gemm_collective', 'gemm_all_reduce', 'gemm_reduce_scatter', 'collectives',\n"
        "        'Collective', 'PlanConfig', 'Problem', 'make_plan'}\n"
        "assert need <= names, need - names\n"
        "assert set(flashoverlap.__all__) <= names\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["RowParallelLinear", "patch_tensor_parallel",
                                  "unpatch_tensor_parallel", "gemm_collective"])
def test_public_names_in_all(name):
    import flashoverlap

    assert name in flashoverlap.__all__ or name in dir(flashoverlap)
    assert callable(getattr(flashoverlap, name))
