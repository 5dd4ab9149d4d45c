"""The package's layering: CLI > commands > services > numerics, imports only downward, no cycles.

The graph is read from the source (every import statement, function-level ones too), so a lazy
import that dodges a cycle counts like any other. Loading a colorizer for inference must not pull
in the training data stack, which is checked in a fresh interpreter.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "smsanet_jax"
CLI = {"cli", "__main__"}
COMMANDS = {"train", "colorize", "saliency", "convert", "export", "demo"}
NUMERICS = {"colorspace", "losses", "metrics", "models", "cpu"}
LAYERS = {"cli": 3, "command": 2, "service": 1, "numerics": 0}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in CLI:
        return "cli"
    if top in COMMANDS:
        return "command"
    return "numerics" if top in NUMERICS else "service"


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                if target == "smsanet_jax" or not target.startswith("smsanet_jax."):
                    continue
                name = target[len("smsanet_jax.") :]
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                # A package's own modules importing its __init__ (or each other) stay inside it.
                if name and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            mine, theirs = layer(module), layer(target)
            sideways = mine == "command" and theirs == "command" and module.split(".")[0] != target.split(".")[0]
            if LAYERS[theirs] > LAYERS[mine] or sideways:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_loading_a_colorizer_imports_no_training_data_stack():
    # A fresh interpreter: the test process itself has these loaded.
    script = textwrap.dedent("""
        import sys
        from smsanet_jax import colorize, hints, inference
        inference.load_colorizer(baseline="gray")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "grain"))
        assert not heavy, heavy[:5]
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
