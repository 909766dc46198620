"""The package's import structure: subpackages load lazily, the CLI answers --help without torch, and no
module of minillm imports (at any depth, lazily or not) a module that imports it back."""
import ast
import json
import pathlib
import subprocess
import sys
import time

import minillm

PACKAGE = pathlib.Path(minillm.__file__).parent


def _run(code: str) -> dict:
    """Runs `code` in a fresh interpreter (from /, so the installed package is the one imported) and returns
    the JSON it prints last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_minillm_loads_no_subpackage_and_no_torch():
    got = _run("import json, sys, minillm; print(json.dumps(sorted(m for m in sys.modules "
               "if m.startswith(('minillm', 'torch')))))")
    assert got == ["minillm"]


def test_import_ops_loads_no_models_and_no_dynamo():
    got = _run("import json, sys, minillm.ops; print(json.dumps(sorted(m for m in sys.modules "
               "if m.startswith('minillm.') or m.startswith('torch._dynamo'))))")
    assert all(m.startswith(("minillm.ops", "minillm._C")) for m in got), got


def test_attributes_load_on_first_use():
    got = _run("import json, minillm; idx = minillm.FlatIndex(4); m = minillm.models.ModelConfig; "
               "print(json.dumps([type(idx).__module__, m.__module__, 'models' in dir(minillm)]))")
    assert got == ["minillm.index", "minillm.models.config", True]


def test_cli_help_imports_no_torch():
    code = ("import json, sys, contextlib, io, minillm.cli as c\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        c.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(json.dumps(['torch' in sys.modules, 'quickstart' in out.getvalue()]))")
    assert _run(code) == [False, True]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minillm", "--help"], capture_output=True, cwd="/", check=True)
    # The interpreter's own start-up is most of this; torch alone would be seconds.
    assert time.perf_counter() - start < 5.0


def _import_graph() -> dict:
    """minillm module -> the minillm modules it imports anywhere in its source (function bodies too)."""
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f

    def resolve(name):  # a name that is not a module (minillm._C, an attribute) counts as its package
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges[m].update(resolve(a.name) for a in node.names if a.name.startswith("minillm"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("minillm"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                edges[m].update(subs)
                if len(subs) < len(node.names):  # names from the package itself
                    edges[m].add(resolve(node.module))
        edges[m].discard(m)
    return edges


def test_no_import_circles():
    edges = _import_graph()
    assert "minillm.tokenizers.loading" in edges and "minillm.models.auto" in edges
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_base_classes_import_no_subclass_module():
    edges = _import_graph()
    assert not edges["minillm.models.base"] & {"minillm.models.pretrained", "minillm.models.decoder",
                                                "minillm.models.encoder", "minillm.models.encoder_decoder"}
    assert not edges["minillm.tokenizers.base"] & {"minillm.tokenizers.bpe", "minillm.tokenizers.char",
                                                    "minillm.tokenizers.pretrained", "minillm.tokenizers.hf"}
