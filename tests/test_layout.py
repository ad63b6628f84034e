"""The scripts import one way, in layers (STYLE.md): data, then splits, synthetic, cutpaste, backbones and metrics on
it; report; patchcore and classify; evaluate on top, the only file that imports the two methods. Imports inside
functions count too."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("data", "splits", "synthetic", "backbones", "metrics", "cutpaste", "report", "patchcore", "classify",
           "evaluate", "select_models", "predict")
ALLOWED = {  # what each script may import from the project
    "data": set(),
    "splits": {"data"},
    "synthetic": {"data"},
    "metrics": {"data"},
    "backbones": {"data"},
    "cutpaste": {"data"},
    "select_models": {"data"},
    "report": {"data", "metrics", "splits"},
    "patchcore": {"data", "backbones", "metrics", "splits"},
    "classify": {"data", "backbones", "metrics", "cutpaste", "splits"},
    "predict": {"data", "backbones", "metrics", "patchcore", "classify"},
    "evaluate": {"data", "splits", "synthetic", "backbones", "metrics", "cutpaste", "report", "patchcore", "classify"},
}


def project_imports(script: str) -> set[str]:
    """Every project module a script imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{script}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(SCRIPTS)


def test_imports_run_one_way():
    for script in SCRIPTS:
        extra = project_imports(script) - ALLOWED[script]
        assert not extra, f"{script}.py imports {sorted(extra)}, which sit above it"


def test_importing_the_methods_loads_no_study_code():
    code = ("import sys, classify, patchcore; "
            "print(sorted(m for m in ('evaluate', 'report', 'select_models', 'synthetic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
