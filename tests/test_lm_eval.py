"""The lm-evaluation-harness model ``gptkernels``: the same log-likelihoods, rolling log-likelihoods and greedy
generations as lm-eval's own ``hf`` model on the same weights (``GPT.save_hf``), lm-eval tasks read from local
files (tests/data/lm_eval/*.yaml), the command lines (``lm_eval --model gptkernels`` through the installed .pth
hook, and ``python -m gptkernels.evaluation.harness``), and the entry point that registers the model.

All offline. lm-eval is heavy to import (~10 s): every import of it is inside a test or fixture."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.checkpoint import save_checkpoint
from gptkernels.evaluation.multiple_choice import load_hellaswag, read_jsonl, score_multiple_choice
from gptkernels.tokenizer import get_tokenizer, save_hf_tokenizer, tokenizer_to_spec

from .cli_helpers import ROOT, cli_env, one_thread, run_cli  # noqa: F401 (fixture)

pytest.importorskip("lm_eval")

DATA = ROOT / "tests" / "data"
TASKS = DATA / "lm_eval"
TOL = 1e-4  # nats: the bar for "the same log-likelihood"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny random GPT with a BPE trained on the sample documents, as a gptkernels checkpoint and as a
    Hugging Face folder (weights + tokenizer) that lm-eval's hf model loads."""
    root = tmp_path_factory.mktemp("lm_eval")
    docs = read_jsonl(DATA / "hellaswag_sample.jsonl")
    texts = [d["ctx"] + " " + " ".join(d["endings"]) for d in docs] + [
        d["text"] for d in read_jsonl(DATA / "text_sample.jsonl")
    ]
    tok = get_tokenizer("bpe:320", text=texts)
    torch.manual_seed(0)
    # context 64: several sample requests are longer and get cut from the left, as lm-eval cuts them
    cfg = GPTConfig(vocab_size=tok.n_vocab, context_length=64, emb_dim=32, n_heads=2, n_layers=2, kernels="torch")
    model = GPT(cfg)
    state = {"step": 0, "model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tokenizer_to_spec(tok)}
    save_checkpoint(root / "ckpt", state)
    model.save_hf(root / "hf")
    save_hf_tokenizer(tok, root / "hf")
    return {"ckpt": root / "ckpt", "hf": root / "hf", "root": root}


@pytest.fixture(scope="module")
def models(files):
    from lm_eval.models.huggingface import HFLM

    from gptkernels.evaluation.lm_eval_model import GPTKernelsLM

    hf = HFLM(pretrained=str(files["hf"]), device="cpu", batch_size=4, dtype="float32")
    ours = GPTKernelsLM(checkpoint=str(files["ckpt"]), device="cpu", batch_size=3)  # other batches than hf's
    return hf, ours


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_the_hf_models(models):
    hf, ours = models
    docs = read_jsonl(DATA / "hellaswag_sample.jsonl")
    args = [(d["ctx"], " " + e) for d in docs for e in d["endings"]]
    args += [("", "Hello there."), ("A context with a trailing space ", "and more"), ("One", " token")]
    reqs = instances("loglikelihood", args)
    theirs, mine = hf.loglikelihood(reqs, disable_tqdm=True), ours.loglikelihood(reqs, disable_tqdm=True)
    assert len(mine) == len(args)
    for (a, ga), (b, gb) in zip(theirs, mine):
        assert abs(a - b) <= TOL, (a, b)
        assert ga == gb


def test_rolling_loglikelihoods_equal_the_hf_models(models):
    hf, ours = models
    texts = [d["text"] for d in read_jsonl(DATA / "text_sample.jsonl")]
    texts.append(" ".join(texts))  # several windows of 64 tokens
    reqs = instances("loglikelihood_rolling", [(t,) for t in texts])
    theirs, mine = (
        hf.loglikelihood_rolling(reqs, disable_tqdm=True),
        ours.loglikelihood_rolling(reqs, disable_tqdm=True),
    )
    assert len(ours.tok_encode(texts[-1])) > 2 * 64
    for a, b in zip(theirs, mine):
        assert abs(a - b) <= TOL, (a, b)


def test_greedy_generations_equal_the_hf_models(models):
    hf, ours = models
    docs = read_jsonl(DATA / "hellaswag_sample.jsonl")
    args = [(d["ctx"], {"until": ["."], "max_gen_toks": 8, "do_sample": False}) for d in docs]
    args += [(docs[0]["ctx"], {"until": ["\n"], "max_gen_toks": 5})]  # other options: another group
    reqs = instances("generate_until", args)
    mine = ours.generate_until(reqs, disable_tqdm=True)
    assert mine == hf.generate_until(reqs, disable_tqdm=True)
    assert not any("." in text for text in mine[:-1])  # cut at the stop string


def test_model_is_registered_and_checks_its_arguments(files):
    from lm_eval.api.registry import get_model

    from gptkernels.evaluation.lm_eval_model import GPTKernelsLM

    assert get_model("gptkernels") is GPTKernelsLM
    lm = GPTKernelsLM.create_from_arg_string(f"checkpoint={files['ckpt']},batch_size=auto,dtype=bf16")
    assert lm.batch_size == 16 and lm.autocast_dtype is torch.bfloat16 and lm.max_length == 64
    with pytest.raises(ValueError, match="checkpoint="):
        GPTKernelsLM()
    with pytest.raises(ValueError, match="unknown model_args.*temprature"):
        GPTKernelsLM(checkpoint=str(files["ckpt"]), temprature=0.5)
    with pytest.raises(ValueError, match="dtype"):
        GPTKernelsLM(checkpoint=str(files["ckpt"]), dtype="int8")
    with pytest.raises(ValueError, match="tokenizer= goes with model="):
        GPTKernelsLM(checkpoint=str(files["ckpt"]), tokenizer="gpt2")
    in_memory = GPTKernelsLM(model=lm.model, tokenizer=lm.tokenizer, device="cpu", dtype="bf16")  # from a notebook
    reqs = instances("loglikelihood", [("The kettle", " boils.")])
    assert in_memory.loglikelihood(reqs, disable_tqdm=True) == lm.loglikelihood(reqs, disable_tqdm=True)


def test_local_tasks_through_lm_eval_agree_with_hf_and_with_evaluate(files, models, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    hf, ours = models
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_CACHE", str(files["root"] / "datasets"))
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)  # skips indexing lm-eval's own tasks
    out = lm_eval.simple_evaluate(
        model="gptkernels",  # by its registered name, as the command line does
        model_args=f"checkpoint={files['ckpt']},device=cpu",
        tasks=["hellaswag_local", "text_local", "qa_local"],
        task_manager=manager,
        batch_size=4,
        log_samples=True,
    )
    results, samples = out["results"], out["samples"]

    # multiple choice: lm-eval's scores equal the hf model's and evaluate's own HellaSwag scorer's
    ll_lm_eval = [[r[0][0] for r in s["resps"]] for s in sorted(samples["hellaswag_local"], key=lambda s: s["doc_id"])]
    args = [a for s in sorted(samples["hellaswag_local"], key=lambda s: s["doc_id"]) for a in s["arguments"]]
    ll_hf = [ll for ll, _ in hf.loglikelihood(instances("loglikelihood", [tuple(a) for a in args]), disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(sum(ll_lm_eval, []), ll_hf)) <= TOL
    mine = score_multiple_choice(ours.model, ours.tokenizer, load_hellaswag(str(DATA / "hellaswag_sample.jsonl")))
    assert mine["n"] == results["hellaswag_local"]["sample_len"] == 6
    assert mine["acc"] == pytest.approx(results["hellaswag_local"]["acc,none"])
    assert mine["acc_norm"] == pytest.approx(results["hellaswag_local"]["acc_norm,none"])
    assert max(abs(a - b) for a, b in zip(sum(mine["loglikelihoods"], []), sum(ll_lm_eval, []))) <= TOL

    # whole documents: lm-eval's bits per byte is the rolling log-likelihood over the UTF-8 bytes
    texts = [d["text"] for d in read_jsonl(DATA / "text_sample.jsonl")]
    lls = hf.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    bpb = -sum(lls) / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)
    assert results["text_local"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)

    # generation ran through the same model and options
    assert results["qa_local"]["sample_len"] == 3 and "exact_match,none" in results["qa_local"]


def test_harness_command_runs_a_local_task(files, tmp_path):
    out = tmp_path / "results"
    proc = run_cli(
        "gptkernels.evaluation.harness",
        *("--model", "gptkernels", "--model_args", f"checkpoint={files['ckpt']}", "--include_path", str(TASKS)),
        *("--tasks", "hellaswag_local", "--batch_size", "4", "--output_path", str(out)),
        cwd=ROOT,
        timeout=300,
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hellaswag_local" in proc.stdout and "acc_norm" in proc.stdout
    (result_file,) = out.rglob("results_*.json")
    result = json.loads(result_file.read_text())
    assert result["results"]["hellaswag_local"]["sample_len"] == 6
    assert result["config"]["model"] == "gptkernels"


def test_entry_point_registers_the_model_for_lm_evals_plugin_discovery(tmp_path):
    """pyproject declares ``[project.entry-points."lm_eval.models"] gptkernels = ...``; lm-eval releases with
    plugin discovery register each such entry point as a lazy placeholder in their model registry. Build this
    checkout's metadata (no install), read the entry point from it and resolve it through lm-eval's Registry."""
    import importlib.metadata as md
    import subprocess

    from lm_eval.api.model import LM
    from lm_eval.api.registry import Registry

    from gptkernels.evaluation.lm_eval_model import GPTKernelsLM

    code = (
        "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        env={**__import__("os").environ, "GPTKERNELS_SKIP_EXTENSION": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist = md.PathDistribution(tmp_path / proc.stdout.strip().splitlines()[-1])  # the .dist-info folder
    assert dist.metadata["Name"] == "gptkernels"
    (ep,) = [e for e in dist.entry_points if e.group == "lm_eval.models"]
    assert ep.name == "gptkernels"
    registry = Registry("model", base_cls=LM)
    registry.register(ep.name, target=ep)
    assert registry.get("gptkernels") is GPTKernelsLM


def _load_setup_py():
    """setup.py's helpers (the .pth file it installs), without running setup()."""
    spec = importlib.util.spec_from_file_location("gptkernels_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _venv_with_pth(folder: Path, *, system_site_packages: bool) -> tuple[str, Path]:
    """A venv without pip (a fraction of a second to make) whose site-packages holds the .pth file that
    ``pip install`` of this checkout puts there (tests/test_install.py checks that pip does). Returns its python
    and its site-packages."""
    flags = ["--system-site-packages"] if system_site_packages else []
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, str(folder)], check=True, timeout=120)
    python = str(folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    setup_py = _load_setup_py()
    (site / setup_py.LM_EVAL_PTH).write_text(setup_py.LM_EVAL_PTH_TEXT, encoding="utf-8")
    return python, site


def _samples(out: Path, task: str) -> dict[int, dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}


def test_lm_eval_command_runs_gptkernels_and_agrees_with_its_hf_model(files, tmp_path):
    """The plain ``lm_eval`` command of lm-eval 0.4.13 (which reads no entry points) with ``--model gptkernels``,
    through the .pth hook this checkout installs (``_gptkernels_lm_eval`` from PYTHONPATH), and the same command
    with ``--model hf`` on the same weights: the same log-likelihood for every ending to 1e-4. The two run at once
    (lm-eval takes seconds to start)."""
    python, _ = _venv_with_pth(tmp_path / "venv", system_site_packages=True)
    model_args = {"gptkernels": f"checkpoint={files['ckpt']}", "hf": f"pretrained={files['hf']},dtype=float32"}
    procs = {}
    for name, args in model_args.items():
        command = [python, "-m", "lm_eval", "--model", name, "--model_args", args, "--device", "cpu"]
        command += ["--include_path", str(TASKS), "--tasks", "hellaswag_local", "--batch_size", "4"]
        command += ["--output_path", str(tmp_path / name), "--log_samples"]
        env = cli_env(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / name / "datasets"))
        procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, f"lm_eval --model {name} failed:\n{err.decode()[-3000:]}"
        outputs[name] = out.decode()
    assert "hellaswag_local" in outputs["gptkernels"] and "acc_norm" in outputs["gptkernels"]

    ours, theirs = _samples(tmp_path / "gptkernels", "hellaswag_local"), _samples(tmp_path / "hf", "hellaswag_local")
    assert sorted(ours) == sorted(theirs) == list(range(6))
    for doc_id, mine in ours.items():
        assert mine["arguments"] == theirs[doc_id]["arguments"]
        lls = [[float(r[0][0]) for r in s["resps"]] for s in (mine, theirs[doc_id])]
        assert len(lls[0]) == len(lls[1]) == 4
        assert max(abs(a - b) for a, b in zip(*lls)) <= TOL, lls
        assert mine["acc_norm"] == theirs[doc_id]["acc_norm"] and mine["acc"] == theirs[doc_id]["acc"]
    (result_file,) = (tmp_path / "gptkernels").rglob("results_*.json")
    assert json.loads(result_file.read_text())["config"]["model"] == "gptkernels"


def test_hook_module_imports_only_itself():
    """``_gptkernels_lm_eval`` runs at every Python start-up (the .pth file): it must import no torch, lm-eval
    or gptkernels, nothing at all but itself. ``-S``: no .pth file of this machine's site-packages runs first."""
    code = (
        "import json, sys; before = set(sys.modules); import _gptkernels_lm_eval as hook; "
        "print(json.dumps({'new': sorted(set(sys.modules) - before), 'finder': hook._Finder in sys.meta_path}))"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(proc.stdout) == {"new": ["_gptkernels_lm_eval"], "finder": True}
    assert proc.stderr == ""


_FAKE_LM_EVAL = {  # registry.py of made-up lm-evals; each lm_eval/models/__init__.py registers "hf"
    "like 0.4.13": "class Registry(dict):\n    def register(self, alias, target=None):\n        self[alias] = target\n",
    "with entry-point discovery": "class Registry(dict):\n    def register(self, alias, target=None):\n"
    "        self[alias] = target\n\ndef load_plugins(group, registry):\n    pass\n",
    "that already knows gptkernels": "class Registry(dict):\n    def register(self, alias, target=None):\n"
    "        self[alias] = target\n\nmodel_registry = Registry(gptkernels='elsewhere:LM')\n",
    "with another registry API": "class Registry:\n    def register(self, *args, **kwargs):\n"
    "        raise RuntimeError('frozen')\n    def __contains__(self, alias):\n        return False\n",
}
_PROBE = """
import inspect, json, sys
import lm_eval.models
from lm_eval.api.registry import model_registry
print(json.dumps({
    "models": dict(model_registry) if isinstance(model_registry, dict) else None,
    "finder_left": any(getattr(f, "__module__", None) == "_gptkernels_lm_eval" for f in sys.meta_path),
    "source": "model_registry" in inspect.getsource(lm_eval.models),  # the wrapped loader still serves it
}))
"""


def test_start_up_stays_clean_without_lm_eval_and_the_hook_leaves_other_lm_evals_alone(tmp_path):
    """In a venv that sees nothing of this machine (no lm-eval, no torch): the .pth file, first without the
    module (a removed checkout), then with it, as a wheel installs it. Start-up prints nothing, ``import lm_eval``
    fails as usual, and made-up lm-evals get the placeholder only when their registry is 0.4.13's."""
    python, site = _venv_with_pth(tmp_path / "venv", system_site_packages=False)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    def run(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
        extra = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
        return subprocess.run(
            [python, "-c", code], env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    missing = run("import sys; print('_gptkernels_lm_eval' in sys.modules)")
    assert (missing.returncode, missing.stdout, missing.stderr) == (0, "False\n", "")
    shutil.copy2(ROOT / "_gptkernels_lm_eval.py", site / "_gptkernels_lm_eval.py")
    code = (
        "import sys, json\ntry:\n    import lm_eval\nexcept ModuleNotFoundError as e:\n    error = str(e)\n"
        "print(json.dumps({'hook': '_gptkernels_lm_eval' in sys.modules, 'error': error,"
        " 'heavy': [m for m in ('torch', 'gptkernels') if m in sys.modules]}))"
    )
    clean = run(code)
    assert clean.returncode == 0 and clean.stderr == "", clean.stderr
    assert json.loads(clean.stdout) == {"hook": True, "error": "No module named 'lm_eval'", "heavy": []}

    for kind, registry_py in _FAKE_LM_EVAL.items():
        root = tmp_path / kind.replace(" ", "_")
        (root / "lm_eval" / "api").mkdir(parents=True)
        (root / "lm_eval" / "models").mkdir()
        (root / "lm_eval" / "__init__.py").write_text("")
        (root / "lm_eval" / "api" / "__init__.py").write_text("")
        if "model_registry =" not in registry_py:
            registry_py += "\nmodel_registry = Registry()\n"
        (root / "lm_eval" / "api" / "registry.py").write_text(registry_py)
        (root / "lm_eval" / "models" / "__init__.py").write_text(
            "from lm_eval.api.registry import model_registry\n\nmodel_registry.register('hf', target='hf:HFLM')\n"
            if "another" not in kind
            else "from lm_eval.api.registry import model_registry\n"
        )
        proc = run(_PROBE, pythonpath=root)
        assert proc.returncode == 0 and proc.stderr == "", (kind, proc.stderr)
        result = json.loads(proc.stdout)
        assert result["source"] is True and result["finder_left"] is False, kind
        expected = {
            "like 0.4.13": {"hf": "hf:HFLM", "gptkernels": "gptkernels.evaluation.lm_eval_model:GPTKernelsLM"},
            "with entry-point discovery": {"hf": "hf:HFLM"},
            "that already knows gptkernels": {"gptkernels": "elsewhere:LM", "hf": "hf:HFLM"},
            "with another registry API": None,
        }[kind]
        assert result["models"] == expected, kind
