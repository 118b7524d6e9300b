"""The dependency direction of ../shared/spec/architecture.md, checked by parsing imports with ast."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# package folder -> top-level modules it must never import
FORBIDDEN = {
    "fwconvert": ("onnx", "onnxruntime", "exporters", "onnxscript"),
    "exporters/runtime": ("torch", "fwconvert.modeling", "transformers"),
}
# modules inside fwconvert that must not import the ones "below" them
LAYERS = {
    "fwconvert/errors.py": ("torch", "fwconvert", "."),
    "fwconvert/config.py": ("torch",),
    "fwconvert/families": ("torch", "fwconvert.modeling", "fwconvert.checkpoint", "fwconvert.fastweights"),
    "fwconvert/fastweights": ("fwconvert.modeling", "fwconvert.checkpoint", "fwconvert.convert", "fwconvert.cli"),
    "fwconvert/checkpoint": ("fwconvert.modeling", "fwconvert.convert", "fwconvert.cli"),
}


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    pkg = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


# The CLI is the top of the house: it may import anything (lazily, inside commands).
EXEMPT = (os.path.join("fwconvert", "cli") + os.sep,)


def _files(where):
    full = os.path.join(ROOT, where)
    if os.path.isfile(full):
        return [full]
    files = [os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".py")]
    return [f for f in files if not os.path.relpath(f, ROOT).startswith(EXEMPT)]


@pytest.mark.parametrize("where,banned", list(FORBIDDEN.items()) + [(k, tuple(b for b in v if b != ".")) for k, v in LAYERS.items()])
def test_dependency_direction(where, banned):
    bad = []
    for path in _files(where):
        for mod in _imports(path):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


REWRITES = ("attention_forms", "causal_attention", "query_order", "rotary_form", "weight_layout")  # exporters/onnx graph rewrites


def test_graph_rewrites_import_only_the_shared_ir_helpers():
    """Each rewrite module reads graphs through ir_values / ir_nodes, never through another rewrite's internals."""
    bad = []
    for name in REWRITES:
        path = os.path.join(ROOT, "exporters", "onnx", name + ".py")
        others = {"exporters.onnx." + r for r in REWRITES if r != name}
        bad += [f"{name}.py imports {mod}" for mod in _imports(path) if mod in others]
    assert not bad, "\n".join(bad)


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fwconvert", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(imported & {"torch", "transformers", "onnx", "onnxruntime"})
    assert not heavy, f"--help imports {heavy}"
    assert "Exit codes" in out.stdout
