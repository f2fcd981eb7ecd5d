"""The lm-evaluation-harness model ``gptkernels``: the same log-likelihoods, rolling log-likelihoods and greedy
generations as lm-eval's own ``hf`` model on the same weights (``GPT.save_hf``), lm-eval tasks read from local
files (tests/data/lm_eval/*.yaml), the command line, and the entry point that registers the model.

All offline. lm-eval is heavy to import (~10 s): every import of it is inside a test or fixture."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.checkpoint import save_checkpoint
from gptkernels.evaluation.multiple_choice import load_hellaswag, read_jsonl, score_multiple_choice
from gptkernels.tokenizer import get_tokenizer, save_hf_tokenizer, tokenizer_to_spec

from .cli_helpers import ROOT, one_thread, run_cli  # noqa: F401 (fixture)

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
