"""A plain ``pip install`` (no flags) into a fresh venv gives the compiled sampling op, built on first use.

One module-wide setup pays for one compile (~1 minute on 2 cores): a venv that sees the installed torch
(``--system-site-packages``, so nothing big is downloaded), ``pip install --no-deps <copy of the repo>`` with pip's
build isolation (no torch at build time, so nothing is compiled then; pip's cache is reused), then two processes
that call ``gptkernels.sample`` at the same moment on an empty cache (a temporary ``TORCH_EXTENSIONS_DIR``): one
compiles, the other waits for it, both run the compiled op.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FIRST_USE = """
import json, sys, torch, gptkernels
from gptkernels import sampling
assert "gptkernels._C" not in sys.modules
x = torch.randn(8, 50257)
u = torch.rand(8, dtype=torch.float64)
ids = gptkernels.sample(x, top_p=0.9, uniforms=u)
assert torch.equal(ids, sampling.sample_reference(x, top_p=0.9, uniforms=u))
print(json.dumps({
    "file": gptkernels.__file__,
    "has_extension": sampling.HAS_EXTENSION,
    "op_registered": hasattr(torch.ops.gptkernels, "sample_tokens"),
    "libraries": sorted(torch.ops.loaded_libraries),
    "origin": sampling._STATE.origin,
    "status": sampling.extension_status(),
}))
"""


def _copy_repo(dest: Path) -> Path:
    """What pip needs to build the package, without any library built here (no _C*.so, no build record)."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "_gptkernels_lm_eval.py"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "csrc", dest / "csrc")
    shutil.copytree(
        ROOT / "gptkernels",
        dest / "gptkernels",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "_C_build.json", "__pycache__"),
    )
    return dest


class Venv:
    def __init__(self, tmp: Path):
        self.tmp, self.dir, self.cache = tmp, tmp / "venv", tmp / "torch_extensions"
        bindir = "Scripts" if sys.platform == "win32" else "bin"
        self.python = str(self.dir / bindir / ("python.exe" if sys.platform == "win32" else "python"))
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env.update(TORCH_EXTENSIONS_DIR=str(self.cache), OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.python, *args], cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result

    def pip_install(self, *args: str) -> None:
        self.run("-m", "pip", "install", "--no-deps", "--quiet", *args)

    def start(self, code: str) -> subprocess.Popen:
        return subprocess.Popen(
            [self.python, "-c", code], cwd=self.tmp, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = _copy_repo(tmp_path_factory.mktemp("src"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True)
    env = Venv(tmp)
    env.pip_install(str(src))  # plain: build isolation, so no torch at build time
    procs = [env.start(FIRST_USE) for _ in range(2)]  # at once, on an empty cache
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err.decode()[-4000:]
        runs.append((json.loads(out.decode().strip().splitlines()[-1]), err.decode()))
    env.src, env.first_runs = src, runs
    return env


def test_plain_install_compiles_the_op_once_on_first_use_even_with_two_processes(venv):
    site = Path(venv.run("-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (built, built_err), (waited, waited_err) = sorted(venv.first_runs, key=lambda r: r[0]["origin"] != "built")
    assert [built["origin"], waited["origin"]] == ["built", "cached"]
    for info in (built, waited):
        assert Path(info["file"]).is_relative_to(site)  # the venv's copy, not the repo's
        assert info["has_extension"] is True and info["op_registered"] is True
        assert info["status"] == "compiled C++ op (CPU)" or info["status"].startswith("compiled C++ op (CPU), CUDA")
        (library,) = info["libraries"]
        assert Path(library).is_relative_to(venv.cache / "gptkernels")
    assert built["libraries"] == waited["libraries"]
    assert built_err.count("gptkernels: compiling the sampling op") == 1
    assert "gptkernels: compiling" not in waited_err
    assert "waiting for another process" in waited_err
    # the sources it compiled came inside the installed package (a wheel ships gptkernels/csrc/)
    (record,) = (venv.cache / "gptkernels").glob("*/build.json")
    assert Path(json.loads(record.read_text())["csrc"]) == site / "gptkernels" / "csrc"


LM_EVAL_MODEL = """
import json, sys
hook = sys.modules["_gptkernels_lm_eval"]  # imported at start-up by gptkernels_lm_eval.pth
from lm_eval.api.registry import get_model
model = get_model("gptkernels")
print(json.dumps({"hook": hook.__file__, "model": sys.modules[model.__module__].__file__}))
"""


def _lm_eval_model_files(venv) -> tuple[Path, Path, Path]:
    """(site-packages, the hook module that start-up imported, the file of the class lm-eval resolves for
    ``gptkernels``): lm-eval 0.4.13 reads no entry points, so the .pth hook is what makes it known."""
    pytest.importorskip("lm_eval")
    site = Path(venv.run("-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    info = json.loads(venv.run("-c", LM_EVAL_MODEL).stdout.strip().splitlines()[-1])
    (record,) = (path.read_text() for path in site.glob("gptkernels-*.dist-info/RECORD"))
    assert "gptkernels_lm_eval.pth," in record  # pip uninstall removes it
    assert (site / "gptkernels_lm_eval.pth").read_text().count("import _gptkernels_lm_eval") == 1
    return site, Path(info["hook"]), Path(info["model"])


def test_plain_install_registers_the_lm_eval_model(venv):
    site, hook, model = _lm_eval_model_files(venv)
    assert hook == site / "_gptkernels_lm_eval.py"
    assert model == site / "gptkernels" / "evaluation" / "lm_eval_model.py"


def test_editable_plain_install_reuses_the_cached_build(venv):
    venv.pip_install("-e", str(venv.src))
    result = venv.run("-c", FIRST_USE)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(venv.src)
    assert info["has_extension"] is True and info["origin"] == "cached"
    assert "gptkernels: compiling" not in result.stderr
    # setuptools' editable wheel holds only its own .pth and finder; setup.py adds the lm-eval one
    _, hook, model = _lm_eval_model_files(venv)
    assert hook == venv.src / "_gptkernels_lm_eval.py"
    assert model == venv.src / "gptkernels" / "evaluation" / "lm_eval_model.py"


def test_build_command_says_what_was_built_and_where(venv):
    out = venv.run("-m", "gptkernels.build").stdout
    assert "sampling op: compiled C++ op (CPU)" in out and "kernels: CPU" in out
    assert f"cache: {venv.cache / 'gptkernels'}" in out and "built earlier on first use (cached)" in out
