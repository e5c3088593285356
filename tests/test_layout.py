"""The layout's rules, read from the code's own imports (docs/architecture.md, Layout)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion_node", "drivers", "engines", "training")
TOOLS = ("training", "fusion_node.bench", "fusion_node.cli", "fusion_node.view")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, module_level_only: bool) -> set[str]:
    """Project modules `path` imports (all of them, or those its module body runs)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def is_tool(module: str) -> bool:
    return any(module == tool or module.startswith(tool + ".") for tool in TOOLS)


def test_the_runtime_never_imports_a_tool():
    """Core, host, logs, drivers and engines run on the robot: they import no training,
    bench, cli or view code, not even lazily."""
    offending = []
    for module, path in modules().items():
        if is_tool(module):
            continue
        offending += [f"{module} -> {name}" for name in sorted(imports(path, False))
                      if is_tool(name)]
    assert offending == []


def test_no_import_cycles_between_modules():
    """Module-level imports form no cycle (a lazy import inside a function may point back:
    replay builds the node's runners only when it replays)."""
    known = modules()
    graph = {m: {n for n in imports(p, True) if n in known and n != m}
             for m, p in known.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, trail: list[str]) -> bool:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycle.extend(trail[trail.index(target):] + [target] if target in trail
                             else [module, target])
                return True
            if target not in state and visit(target, trail + [target]):
                return True
        state[module] = 2
        return False

    for module in graph:
        if module not in state and visit(module, [module]):
            break
    assert cycle == []
