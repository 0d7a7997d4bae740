"""The pipeline's uuid (its part of Inductor's cache key) is made from the imported source, so it is the
same in an editable checkout and in an installed wheel, and it changes with any code that decides
what the passes write."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared import ROOT

# Prints the default pipeline's uuid, then the uuid after each file (relative to the installed
# package) gets one more line, then restores it.
UUIDS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import lynx_compile
    from lynx_compile import LynxConfig
    from lynx_compile.passes import source_digest
    from lynx_compile.passes.pipeline import build_pipeline

    def uuid(options=None):
        source_digest.source_digest.cache_clear()
        return build_pipeline(LynxConfig.from_options(options), param_inputs=frozenset(), graph_index=0).uuid()

    package = Path(lynx_compile.__file__).parent
    out = {"file": lynx_compile.__file__, "default": uuid(), "pattern 1:2": uuid({"pattern": "1:2"}), "edited": {}}
    for name in json.loads(sys.argv[1]):
        path = package / name
        source = path.read_text()
        path.write_text(source + "\\n# edited\\n")
        try:
            out["edited"][name] = uuid()
        finally:
            path.write_text(source)
    out["restored"] = uuid()
    print(json.dumps(out))
""")

EDITS = ["policy.py", "config.py", "cost_model.py", "plan.py", "passes/sparsify_gemms.py", "passes/inline_triton.py",
         "passes/pipeline.py", "kernels/contract.py", "kernels/reference.py", "kernels/triton_sparse_mm.py",
         "kernels/ops.py"]
NOT_USED = ["demo.py", "calibration/api.py"]  # the passes never import them: no effect on compiled graphs


def _uuids(env, cwd, edits) -> dict:
    result = subprocess.run([sys.executable, "-c", UUIDS, json.dumps(edits)], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_uuid_is_the_same_installed_and_follows_every_source_the_passes_use(tmp_path):
    # A non-editable install of a copy of this checkout (its passes/ and kernels/ end up inside lynx_compile/).
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name) if source.exists() else (source.mkdir(), shutil.copy(ROOT / name, source))
    for folder in ("lynx_compile", "passes", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          str(source)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "lynx_compile" / "passes" / "pipeline.py").is_file()

    editable = _uuids(dict(os.environ), ROOT, [])
    installed = _uuids({**os.environ, "PYTHONPATH": str(target)}, tmp_path, EDITS + NOT_USED)
    assert Path(editable["file"]).parent == ROOT / "lynx_compile"
    assert Path(installed["file"]).parent == target / "lynx_compile"

    assert installed["default"] == editable["default"]
    assert installed["pattern 1:2"] == editable["pattern 1:2"] != editable["default"]
    changed = {name for name, uuid in installed["edited"].items() if uuid != installed["default"]}
    assert changed == set(EDITS)
    assert installed["restored"] == installed["default"]


def test_closure_of_the_pipeline_names_the_modules_it_imports():
    from lynx_compile.passes.source_digest import module_closure

    closure = set(module_closure("lynx_compile.passes.pipeline"))
    for module in ("policy", "config", "cost_model", "plan", "report", "layer_filter", "passes.sparsify_gemms",
                   "passes.inline_triton", "passes.rewrite_gemm", "passes.gemm_sites", "kernels.ops",
                   "kernels.contract", "kernels.reference", "kernels.registry", "kernels.triton_ops"):
        assert f"lynx_compile.{module}" in closure
    assert not closure & {"lynx_compile.demo", "lynx_compile.calibration", "lynx_compile.cli"}


@pytest.mark.parametrize("name", ["lynx_compile.passes.pipeline", "lynx_compile.passes.inline_triton"])
def test_digest_is_stable_within_a_process(name):
    from lynx_compile.passes.source_digest import source_digest

    first = source_digest(name)
    source_digest.cache_clear()
    assert source_digest(name) == first and len(first) == 64
