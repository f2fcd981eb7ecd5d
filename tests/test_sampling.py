"""gptkernels.sample: the compiled op (CPU here, CUDA on a GPU machine) and sample_reference.

The op draws by inverse CDF from one uniform per row, so feeding it a stratified grid of uniforms
u_i = (i + 1/2) / N turns the distribution test into an exact one: every token must be drawn N * p +- 1 times,
with p the filtered softmax computed independently in float64 (``_oracle_probs``). A filter that keeps one token too
many or too few fails that at once. Random draws from a generator are checked with a chi-square bound.
"""

import math
import re
import warnings

import pytest
import torch

from gptkernels import sampling
from gptkernels.sampling import sample, sample_reference

from .tolerances import assert_close_to_oracle

needs_ext = pytest.mark.skipif(not sampling.HAS_EXTENSION, reason="gptkernels._C is not built")
IMPLS = [pytest.param("ext", marks=needs_ext), "ref"]


def _impl(name):
    return sample if name == "ext" else sample_reference


def _run(impl, logits, **kw):
    """The implementation's (ids, logprobs); "ext" must not fall back to the reference."""
    if impl == "ext":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning would mean the op did not run
            return sample(logits, return_logprobs=True, **kw)
    return sample_reference(logits, return_logprobs=True, **kw)


def _oracle_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, prev=None):
    """The filtered distribution of one row (V,) in float64, written independently of the implementations."""
    x = logits.double().clone()
    if repetition_penalty is not None:
        ids = prev.unique()
        v = x[ids]
        x[ids] = torch.where(v > 0, v / repetition_penalty, v * repetition_penalty)
    if temperature == 0 or top_k == 1:
        p = torch.zeros_like(x)
        p[int(x.argmax())] = 1.0
        return p
    x = x / temperature
    p = torch.softmax(x, dim=0)
    if top_k:
        kth = x.sort(descending=True).values[min(top_k, x.numel()) - 1]
        p = torch.where(x >= kth, p, 0.0)
        p = p / p.sum()
    if top_p is not None and top_p < 1:
        ps = p.sort(descending=True).values
        n = int((ps.cumsum(0) < top_p).sum()) + 1  # the smallest prefix reaching top_p
        p = torch.where(p >= ps[min(n, p.numel()) - 1], p, 0.0)  # ... and every token tied with its last
        p = p / p.sum()
    if min_p:
        p = torch.where(p >= min_p * p.max(), p, 0.0)
        p = p / p.sum()
    return p


def _stratified(n, device):
    return (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n


def _counts_from_grid(impl, row, n, chunk=None, **kw):
    """Token counts over the stratified grid of n uniforms, the row repeated n times."""
    v = row.shape[0]
    counts = torch.zeros(v, dtype=torch.int64)
    chunk = chunk or n
    u_all = _stratified(n, row.device)
    for i in range(0, n, chunk):
        u = u_all[i : i + chunk]
        logits = row.expand(u.shape[0], v)
        extra = {}
        if kw.get("repetition_penalty") is not None:
            extra["prev_tokens"] = kw["prev"].expand(u.shape[0], -1)
        kwargs = {k: val for k, val in kw.items() if k != "prev"}
        ids, _ = _run(impl, logits, uniforms=u, **kwargs, **extra)
        counts += torch.bincount(ids.cpu(), minlength=v)
    return counts


CONFIGS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.1),
    "all": dict(temperature=1.3, top_k=10, top_p=0.8, min_p=0.05),
    "penalty": dict(temperature=0.9, top_p=0.95, repetition_penalty=1.5),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_stratified_counts_match_filtered_softmax(impl, dtype, config, device):
    v, n = 37, 4096
    row = (torch.randn(v, device=device) * 2).to(dtype)
    kw = dict(CONFIGS[config])
    if "repetition_penalty" in kw:
        kw["prev"] = torch.tensor([[3, 5, 5, 8, int(row.float().argmax())]], device=device)
    p = _oracle_probs(
        row.cpu(), prev=kw.get("prev", torch.zeros(1)).cpu(), **{k: x for k, x in kw.items() if k != "prev"}
    )
    counts = _counts_from_grid(impl, row, n, **kw)
    err = (counts.double() - n * p).abs()
    assert err.max() <= 1.0 + 1e-3, (
        f"token {int(err.argmax())}: {int(counts[err.argmax()])} draws, expected {n * p[err.argmax()]:.2f}"
    )


@needs_ext
@pytest.mark.parametrize("config", ["top_k", "top_p", "min_p"])
def test_stratified_counts_gpt2_vocab(config, device):
    """V=50257 with peaked logits (the top-p set holds tens of tokens), as in generation."""
    v, n = 50257, 2048
    row = torch.randn(v, device=device) * 4
    kw = {"top_k": dict(top_k=50), "top_p": dict(top_p=0.9), "min_p": dict(min_p=0.05)}[config]
    p = _oracle_probs(row.cpu(), temperature=0.8, **kw)
    counts = _counts_from_grid("ext", row, n, chunk=256, temperature=0.8, **kw)
    err = (counts.double() - n * p).abs()
    assert err.max() <= 1.0 + 1e-3, (
        f"token {int(err.argmax())}: {int(counts[err.argmax()])} draws, expected {n * p[err.argmax()]:.2f}"
    )
    assert counts[p == 0].sum() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_generator_draws_chi_square(impl, device):
    v, n = 23, 20000
    row = torch.randn(v, device=device) * 1.5
    kw = dict(temperature=0.9, top_k=12, top_p=0.9)
    p = _oracle_probs(row.cpu(), **kw)
    g = torch.Generator(device=device).manual_seed(1234)
    ids, _ = _run(impl, row.expand(n, v), generator=g, **kw)
    counts = torch.bincount(ids.cpu(), minlength=v).double()
    assert counts[p == 0].sum() == 0, "a filtered-out token was drawn"
    kept = p > 0
    chi2 = float(((counts[kept] - n * p[kept]) ** 2 / (n * p[kept])).sum())
    df = int(kept.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), f"chi-square {chi2:.1f} with {df} degrees of freedom"


@pytest.mark.parametrize("impl", IMPLS)
def test_top_k_and_top_p_stay_inside_their_sets(impl, device):
    b, v = 300, 1000
    logits = torch.randn(b, v, device=device) * 3
    g = torch.Generator(device=device).manual_seed(0)
    ids, _ = _run(impl, logits, top_k=7, generator=g)
    kth = logits.topk(7, dim=1).values[:, -1]
    assert (logits.gather(1, ids[:, None]).squeeze(1) >= kth).all()
    ids, _ = _run(impl, logits, top_p=0.5, generator=g)
    for r in range(b):
        assert _oracle_probs(logits[r].cpu(), top_p=0.5)[ids[r]] > 0, f"row {r}: token outside the nucleus"


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_are_kept_together(impl, device):
    row = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, -1.0], device=device)
    n = 3000
    for kw in (dict(top_k=2), dict(top_p=0.5), dict(min_p=1.0)):  # each keeps exactly the three tied tokens
        counts = _counts_from_grid(impl, row, n, **kw)
        assert counts.tolist() == [1000, 1000, 1000, 0, 0, 0], kw
    for kw in (dict(top_k=1), dict(temperature=0.0)):  # greedy: the first maximum
        ids, lp = _run(impl, row.expand(5, 6), **kw)
        assert ids.tolist() == [0] * 5 and lp.tolist() == [0.0] * 5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(impl, dtype, device):
    logits = (torch.randn(32, 1001, device=device) * 3).to(dtype)
    logits[5, :500] = -math.inf
    expected = logits.float().argmax(dim=1)
    for kw in (dict(temperature=0.0), dict(top_k=1), dict(temperature=0.0, top_p=0.3, min_p=0.2)):
        ids, lp = _run(impl, logits, **kw)
        assert torch.equal(ids, expected) and (lp == 0).all()
    prev = torch.randint(0, 1001, (32, 20), device=device)
    ids, _ = _run(impl, logits, temperature=0.0, repetition_penalty=3.0, prev_tokens=prev)
    expected = torch.stack(
        [_oracle_probs(logits[r].cpu(), 0.0, repetition_penalty=3.0, prev=prev[r].cpu()).argmax() for r in range(32)]
    )
    assert torch.equal(ids.cpu(), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_logits_are_never_drawn(impl, device):
    logits = torch.randn(200, 50, device=device)
    logits[:, ::2] = -math.inf
    logits[0, 2:] = -math.inf  # a row with one finite logit (id 1)
    ids, _ = _run(impl, logits, uniforms=_stratified(200, device))
    assert (ids % 2 == 1).all() and ids[0] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_match_float64(impl, device):
    b, v = 40, 517
    logits = torch.randn(b, v, device=device) * 2.5
    kws = [dict(temperature=0.7), dict(top_k=20, temperature=1.2), dict(top_p=0.8), dict(min_p=0.1, top_k=50)]
    for kw in kws:
        u = torch.rand(b, dtype=torch.float64, device=device)
        ids, lp = _run(impl, logits, uniforms=u, **kw)
        _, lp_ref = sample_reference(logits, uniforms=u, return_logprobs=True, **kw)
        oracle = torch.stack([_oracle_probs(logits[r].cpu(), **kw)[ids[r]].log() for r in range(b)])
        assert torch.isfinite(oracle).all(), "a drawn token has zero probability"
        assert_close_to_oracle(lp.cpu(), lp_ref.cpu(), oracle, torch.float32, f"logprobs {kw}")


@pytest.mark.parametrize("impl", IMPLS)
def test_per_row_parameters_equal_row_by_row_calls(impl, device):
    b, v = 7, 300
    logits = torch.randn(b, v, device=device) * 2
    prev = torch.randint(0, v, (b, 11), device=device)
    u = torch.rand(b, dtype=torch.float64, device=device)
    rows = dict(
        temperature=[0.5, 1.0, 0.0, 1.7, 0.9, 1.0, 0.8],
        top_k=[0, 5, 0, 40, 1, 300, 17],
        top_p=[1.0, 0.9, 0.5, 0.7, 1.0, 0.3, 0.95],
        min_p=[0.0, 0.0, 0.1, 0.02, 0.0, 0.5, 0.05],
        repetition_penalty=[1.0, 1.3, 2.0, 0.8, 1.0, 1.1, 1.5],
    )
    per_row = {
        k: torch.tensor(vals, device=device, dtype=torch.long if k == "top_k" else torch.float32)
        for k, vals in rows.items()
    }
    ids, lp = _run(impl, logits, uniforms=u, prev_tokens=prev, **per_row)
    for r in range(b):
        one = {k: vals[r] for k, vals in rows.items()}
        i1, l1 = _run(impl, logits[r : r + 1], uniforms=u[r : r + 1], prev_tokens=prev[r : r + 1], **one)
        assert ids[r] == i1[0] and torch.equal(lp[r : r + 1], l1), f"row {r} {one}"


@pytest.fixture
def one_thread():
    """The reference's large elementwise ops split across OpenMP threads crawl when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_draws_what_the_reference_draws(dtype, device, one_thread):
    gen = torch.Generator().manual_seed(7)
    for v, b in (
        (1, 3),
        (2, 5),
        (100, 16),
        (4099, 7),
        (50257, 2),
    ):  # few rows: the reference crawls when OpenMP splits ops on a busy machine
        logits = (torch.randn(b, v, generator=gen) * (1 + 6 * torch.rand(b, 1, generator=gen))).to(dtype).to(device)
        if v > 10:
            logits[0, : v // 3] = -math.inf
        prev = torch.randint(0, v, (b, 13), generator=gen).to(device)
        for _ in range(8):
            kw = dict(
                temperature=float(torch.rand(1, generator=gen)) * 2,
                top_k=int(torch.randint(0, 60, (1,), generator=gen)),
                top_p=float(torch.rand(1, generator=gen)) * 0.9 + 0.1,
                min_p=float(torch.rand(1, generator=gen)) * 0.3,
                repetition_penalty=1 + float(torch.rand(1, generator=gen)),
                prev_tokens=prev,
            )
            u = torch.rand(b, dtype=torch.float64, generator=gen).to(device)
            ids, lp = _run("ext", logits, uniforms=u, **kw)
            ids_ref, lp_ref = sample_reference(logits, uniforms=u, return_logprobs=True, **kw)
            assert torch.equal(ids, ids_ref), f"V={v} {kw}"
            torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_generator_reproducibility(impl, device):
    logits = torch.randn(16, 999, device=device)

    def draw(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.stack([_run(impl, logits, top_p=0.95, generator=g)[0] for _ in range(3)])

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


BAD_NUMBERS = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-2.0), "repetition_penalty"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kw, name", BAD_NUMBERS)
def test_bad_parameters_raise(impl, per_row, kw, name, device):
    b, v = 3, 10
    logits = torch.randn(b, v, device=device)
    prev = torch.zeros(b, 2, dtype=torch.long, device=device)
    ((key, value),) = kw.items()
    if per_row:  # only row 1 is bad: the op finds it (no Python check of tensor values)
        good = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}[key]
        dtype = torch.long if key == "top_k" else torch.float32
        value = torch.tensor([good, value, good], dtype=dtype, device=device)
    with pytest.raises(ValueError, match=("row 1: " if per_row else "") + name):
        _run(impl, logits, prev_tokens=prev, **{key: value})


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_logits_and_tokens_raise(impl, device):
    v = 10
    for fill, match in ((math.nan, "NaN"), (math.inf, r"\+inf")):
        logits = torch.randn(3, v, device=device)
        logits[2, 4] = fill
        with pytest.raises(ValueError, match=f"row 2: logits contain {match}"):
            _run(impl, logits)
    logits = torch.randn(3, v, device=device)
    logits[1] = -math.inf
    with pytest.raises(ValueError, match="row 1: logits have no finite value"):
        _run(impl, logits, top_k=3)
    with pytest.raises(ValueError, match="prev_tokens"):
        _run(
            impl,
            torch.randn(2, v, device=device),
            repetition_penalty=1.2,
            prev_tokens=torch.tensor([[1], [v]], device=device),
        )
    with pytest.raises(ValueError, match="repetition_penalty needs prev_tokens"):
        _run(impl, torch.randn(2, v, device=device), repetition_penalty=1.2)
    with pytest.raises(ValueError, match="overflows"):
        _run(impl, torch.full((1, v), 3e38, device=device), temperature=1e-3)
    with pytest.raises(TypeError, match="top_k"):
        _run(impl, torch.randn(2, v, device=device), top_k=2.5)
    with pytest.raises(TypeError, match="logits"):
        _run(impl, torch.zeros(2, v, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="logits"):
        _run(impl, torch.randn(2, 3, v, device=device))
    with pytest.raises(ValueError, match="temperature"):
        _run(impl, torch.randn(2, v, device=device), temperature=torch.ones(3, device=device))


@needs_ext
def test_validate_false_marks_bad_rows_instead_of_raising(device):
    logits = torch.randn(3, 10, device=device)
    logits[1, 0] = math.nan
    ids, lp = sample(logits, top_k=3, return_logprobs=True, validate=False)
    assert ids[1] == -8 and torch.isnan(lp[1])  # -(status code): 8 is NaN logits
    assert 0 <= ids[0] < 10 and 0 <= ids[2] < 10


def _bad_rows(device):
    """Logits and per-row settings of a (12, V) batch whose row r fails with status code r + 1; row 11 is fine."""
    b, v = 12, 10
    logits = torch.randn(b, v, device=device)
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
    col = {name: torch.full((b,), good, dtype=torch.float64, device=device) for name, good in neutral.items()}
    col["temperature"][0] = -1.0  # 1
    col["top_k"][1] = -1  # 2
    col["top_p"][2] = 1.5  # 3
    col["min_p"][3] = 1.1  # 4
    col["repetition_penalty"][4] = 0.0  # 5
    uniforms = torch.rand(b, dtype=torch.float64, device=device)
    uniforms[5] = 1.0  # 6
    prev = torch.zeros(b, 2, dtype=torch.long, device=device)
    prev[6, 1] = v  # 7
    logits[7, 3] = math.nan  # 8
    logits[8, 5] = math.inf  # 9
    logits[9] = -math.inf  # 10
    logits[10] = 3e38  # 11, with:
    col["temperature"][10] = 1e-3
    col["top_k"] = col["top_k"].long()
    return logits, dict(**col, prev_tokens=prev, uniforms=uniforms)


def _rows(kw, rows):
    return {k: x[rows] for k, x in kw.items()}


def _sample_unchecked(impl, monkeypatch, logits, **kw):
    """sample(validate=False) through the compiled op ("ext") or the PyTorch implementation ("ref")."""
    if impl == "ref":
        monkeypatch.setattr(sampling, "HAS_EXTENSION", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sample(logits, return_logprobs=True, validate=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would mean the op did not run
        return sample(logits, return_logprobs=True, validate=False, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_validate_false_gives_minus_the_status_code(impl, monkeypatch, device):
    """Every status code 1..11 comes back as id -code (the reason stays on the device), NaN logprob."""
    logits, kw = _bad_rows(device)
    ids, lp = _sample_unchecked(impl, monkeypatch, logits, **kw)
    assert ids[:11].tolist() == [-c for c in range(1, 12)]
    assert torch.isnan(lp[:11]).all()
    assert 0 <= int(ids[11]) < 10 and not torch.isnan(lp[11])


@needs_ext
def test_bad_rows_same_bits_in_op_and_reference(monkeypatch, device):
    logits, kw = _bad_rows(device)
    ext = _sample_unchecked("ext", monkeypatch, logits, **kw)
    ref = _sample_unchecked("ref", monkeypatch, logits, **kw)
    assert torch.equal(ext[0], ref[0])
    torch.testing.assert_close(ext[1], ref[1], atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_check_sampled_raises_what_validate_raises(impl, monkeypatch, device):
    """For each bad row r (alone after a good row): check_sampled(ids of validate=False) raises the same error
    as validate=True; ids of good rows pass."""
    logits, kw = _bad_rows(device)
    for r in range(11):
        rows = torch.tensor([11, r], device=device)
        with pytest.raises(ValueError) as immediate:
            sample(logits[rows], validate=True, **_rows(kw, rows))
        ids, _ = _sample_unchecked(impl, monkeypatch, logits[rows], **_rows(kw, rows))
        with pytest.raises(ValueError) as deferred:
            sampling.check_sampled(ids)
        assert str(deferred.value) == str(immediate.value)
        assert str(deferred.value).startswith("sample: row 1: ")
        monkeypatch.undo()
    ids, _ = _sample_unchecked(impl, monkeypatch, logits, **kw)
    with pytest.raises(ValueError, match=r"^sample: row 0: temperature must be"):  # the first bad row
        sampling.check_sampled(ids)


def test_check_sampled_shapes_and_codes():
    from gptkernels import check_sampled  # exported beside sample

    assert check_sampled(torch.tensor([0, 5, 3])) is None
    assert check_sampled(torch.tensor(7)) is None
    assert check_sampled(torch.empty(0, dtype=torch.long)) is None
    with pytest.raises(ValueError, match=r"^sample: row 0: logits contain \+inf$"):
        check_sampled(torch.tensor(-9))
    for code, message in sampling._STATUS.items():
        with pytest.raises(ValueError, match=f"^sample: row 2: {re.escape(message)}$"):
            check_sampled(torch.tensor([4, 0, -code, -1]))
    with pytest.raises(ValueError, match="row 0: unknown status 99"):
        check_sampled(torch.tensor([-99]))


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_logits(impl, device):
    out = torch.randn(5, 3, 211, device=device)  # a model's (B, T, V) output: sample the last position
    u = torch.rand(5, dtype=torch.float64, device=device)
    kw = dict(top_k=40, top_p=0.9, uniforms=u)
    assert torch.equal(_run(impl, out[:, -1, :], **kw)[0], _run(impl, out[:, -1, :].contiguous(), **kw)[0])
    cols = out.transpose(1, 2)[:, :, 0]  # vocabulary not contiguous
    assert torch.equal(_run(impl, cols, **kw)[0], _run(impl, cols.contiguous(), **kw)[0])
    row = out[0, 0].expand(5, 211)  # stride 0 between rows
    assert torch.equal(_run(impl, row, **kw)[0], _run(impl, row.contiguous(), **kw)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_one_dimensional_logits(impl, device):
    ids, lp = _run(impl, torch.randn(50, device=device), top_k=5, uniforms=torch.tensor([0.3], dtype=torch.float64))
    assert ids.shape == () and lp.shape == () and 0 <= int(ids) < 50


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl, device):
    """B = 0 (no launch on CUDA) gives empty outputs, drawn uniforms or given ones."""
    logits = torch.randn(0, 33, device=device)
    for kw in (dict(top_k=5, top_p=0.9), dict(uniforms=torch.empty(0, dtype=torch.float64, device=device))):
        ids, lp = _run(impl, logits, **kw)
        assert ids.shape == (0,) and ids.dtype == torch.long and lp.shape == (0,) and lp.dtype == torch.float32
        assert ids.device == logits.device


@needs_ext
def test_opcheck_and_compile(device):
    b, v = 3, 17
    logits, u = torch.randn(b, v, device=device), torch.rand(b, dtype=torch.float64, device=device)
    prev = torch.randint(0, v, (b, 4), device=device)
    row_params = torch.tensor(
        [[0.7, 3, 0.9, 0.05, 1.2], [1.0, 0, 1.0, 0.0, 1.0], [0.0, 0, 1.0, 0.0, 2.0]], dtype=torch.float64, device=device
    )
    for args in (
        (logits, u, [0.7, 3.0, 0.9, 0.05, 1.2], None, prev, True),
        (logits, u, [1.0, 0.0, 1.0, 0.0, 1.0], row_params, prev, True),
    ):
        torch.library.opcheck(torch.ops.gptkernels.sample_tokens.default, args)

    def fn(logits, u):
        return sample(logits, temperature=0.7, top_k=5, top_p=0.9, uniforms=u, return_logprobs=True)

    logits, u = torch.randn(4, 100, device=device), torch.rand(4, dtype=torch.float64, device=device)
    compiled = torch.compile(fn, fullgraph=True)
    ids, lp = compiled(logits, u)
    ids_eager, lp_eager = fn(logits, u)
    assert torch.equal(ids, ids_eager) and torch.equal(lp, lp_eager)
    drawn = torch.compile(lambda x: sample(x, top_p=0.9), fullgraph=True)(logits)  # uniforms drawn inside
    assert drawn.shape == (4,) and ((0 <= drawn) & (drawn < 100)).all()


@needs_ext
def test_fallback_warns_once_and_draws_the_same(monkeypatch, device):
    logits = torch.randn(5, 300, device=device)
    u = torch.rand(5, dtype=torch.float64, device=device)
    expected = sample(logits, top_k=30, top_p=0.9, uniforms=u)
    monkeypatch.setattr(sampling, "HAS_EXTENSION", False)
    monkeypatch.setattr(sampling, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="slower PyTorch implementation") as record:
        got = [sample(logits, top_k=30, top_p=0.9, uniforms=u) for _ in range(3)]
    assert len([w for w in record if "slower PyTorch" in str(w.message)]) == 1
    assert all(torch.equal(g, expected) for g in got)


@pytest.mark.cuda
@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_draws_what_the_cpu_draws(dtype):
    assert sampling.HAS_CUDA_EXTENSION, "the extension was built without its CUDA kernel"
    gen = torch.Generator().manual_seed(11)
    for v, b in ((3, 4), (1000, 64), (50257, 16)):
        logits = (torch.randn(b, v, generator=gen) * 4).to(dtype)
        logits[0, ::3] = -math.inf
        prev = torch.randint(0, v, (b, 9), generator=gen)
        u = torch.rand(b, dtype=torch.float64, generator=gen)
        for kw in (
            dict(),
            dict(top_k=50),
            dict(top_p=0.9, temperature=0.8),
            dict(min_p=0.05),
            dict(top_k=1000, top_p=0.95, min_p=0.01, repetition_penalty=1.3),
        ):
            if "repetition_penalty" in kw:
                kw["prev_tokens"] = prev
            cpu = sample(logits, uniforms=u, return_logprobs=True, **kw)
            kw_cuda = {k: (x.cuda() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
            gpu = sample(logits.cuda(), uniforms=u.cuda(), return_logprobs=True, **kw_cuda)
            assert torch.equal(gpu[0].cpu(), cpu[0]), f"V={v} {kw}"
            torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-6, rtol=0)
    g1 = torch.Generator(device="cuda").manual_seed(5)
    g2 = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(8, 5000, device="cuda")
    assert torch.equal(sample(logits, top_p=0.9, generator=g1), sample(logits, top_p=0.9, generator=g2))
