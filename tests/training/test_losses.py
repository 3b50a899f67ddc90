"""InfoNCE against hand-computed cross-entropies; GradCache against the plain full-batch gradients."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from assay.training.losses import GradCache, InfoNCELoss, MiniBatches, gradcache_step  # noqa: E402

# --- InfoNCE ------------------------------------------------------------------------------------


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def test_default_temperature_is_003():
    assert InfoNCELoss().temperature == 0.03
    assert "temperature=0.03" in repr(InfoNCELoss())
    with pytest.raises(ValueError):
        InfoNCELoss(temperature=0)


def test_equals_hand_computed_cross_entropy():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    n = torch.tensor([[[-1.0, 0.0]], [[0.0, 0.5]]], dtype=torch.float64)  # one hard negative each
    t = 0.5
    # Row 0 scores: p0 .6, p1 .8, n0 -1, n1 0 ; row 1: p0 .8, p1 .6, n0 0, n1 .5.
    row0 = -0.6 / t + math.log(sum(math.exp(s / t) for s in (0.6, 0.8, -1.0, 0.0)))
    row1 = -0.6 / t + math.log(sum(math.exp(s / t) for s in (0.8, 0.6, 0.0, 0.5)))
    loss = InfoNCELoss(temperature=t)(q, p, n)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)

    # In-batch only, no hard negatives.
    row0 = -0.6 / t + math.log(math.exp(0.6 / t) + math.exp(0.8 / t))
    row1 = -0.6 / t + math.log(math.exp(0.8 / t) + math.exp(0.6 / t))
    assert InfoNCELoss(temperature=t)(q, p).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)

    # Own hard negatives only, no in-batch: row 0 {p0 .6, n0 -1}, row 1 {p1 .6, n1 .5}.
    own = InfoNCELoss(temperature=t, in_batch_negatives=False, share_hard_negatives=False)
    row0 = -0.6 / t + math.log(math.exp(0.6 / t) + math.exp(-1.0 / t))
    row1 = -0.6 / t + math.log(math.exp(0.6 / t) + math.exp(0.5 / t))
    assert own(q, p, n).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_matches_cross_entropy_on_explicit_logits():
    b, k, d = 5, 3, 8
    q, p, n = unit(b, d, seed=1), unit(b, d, seed=2), unit(b, k, d, seed=3)
    logits = torch.cat([q @ p.T, q @ n.reshape(b * k, d).T], dim=1) / 0.03
    expected = F.cross_entropy(logits, torch.arange(b))
    torch.testing.assert_close(InfoNCELoss()(q, p, n), expected)
    torch.testing.assert_close(InfoNCELoss().compute_loss_from_embeddings(q, p, n), expected)


@pytest.mark.parametrize(
    ("in_batch", "shared", "width", "target0"),
    [
        (True, True, 4 + 4 * 3, [0, 1, 2, 3]),
        (True, False, 4 + 3, [0, 1, 2, 3]),
        (False, True, 1 + 4 * 3, [0] * 4),
        (False, False, 1 + 3, [0] * 4),
    ],
)
def test_logits_shapes(in_batch, shared, width, target0):
    b, k, d = 4, 3, 6
    loss = InfoNCELoss(in_batch_negatives=in_batch, share_hard_negatives=shared)
    logits, target = loss.compute_logits(unit(b, d), unit(b, d, seed=1), unit(b, k, d, seed=2))
    assert logits.shape == (b, width)
    assert target.tolist() == target0
    logits, _ = loss.compute_logits(unit(b, d), unit(b, d, seed=1))
    assert logits.shape == (b, b if in_batch else 1)


def test_flat_negatives_equal_3d_negatives():
    b, k, d = 4, 2, 6
    q, p, n = unit(b, d), unit(b, d, seed=1), unit(b, k, d, seed=2)
    for shared in (True, False):
        loss = InfoNCELoss(share_hard_negatives=shared)
        torch.testing.assert_close(loss(q, p, n), loss(q, p, n.reshape(b * k, d)))
    with pytest.raises(ValueError):
        InfoNCELoss()(q, p, unit(b * k + 1, d))


def test_own_negatives_only_ignore_other_queries_negatives():
    b, k, d = 3, 2, 6
    q, p, n = unit(b, d), unit(b, d, seed=1), unit(b, k, d, seed=2)
    loss = InfoNCELoss(share_hard_negatives=False)
    logits, _ = loss.compute_logits(q, p, n)
    for i in range(b):
        torch.testing.assert_close(logits[i, b:], (n[i] @ q[i]) / 0.03)
    # Changing query 1's negatives does not change row 0's loss.
    n2 = n.clone()
    n2[1] = unit(k, d, seed=9)
    l1, _ = loss.compute_logits(q, p, n2)
    torch.testing.assert_close(l1[0], logits[0])


def test_neg_mask_drops_padding():
    b, k, d = 3, 3, 6
    q, p, n = unit(b, d), unit(b, d, seed=1), unit(b, k, d, seed=2)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, 2] = mask[2, 1:] = False  # query 0 has 2 negatives, query 2 has 1
    for shared in (True, False):
        loss = InfoNCELoss(share_hard_negatives=shared)
        logits, target = loss.compute_logits(q, p, n, neg_mask=mask)
        if shared:
            keep = torch.cat([torch.ones(b, dtype=torch.bool), mask.reshape(-1)])
            expected = F.cross_entropy(logits[:, keep], target)
        else:
            rows = [
                F.cross_entropy(torch.cat([q[i] @ p.T, n[i][mask[i]] @ q[i]])[None] / 0.03, target[i : i + 1])
                for i in range(b)
            ]
            expected = torch.stack(rows).mean()
        got = loss(q, p, n, neg_mask=mask)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(loss(q, p, n.reshape(b * k, d), neg_mask=mask.reshape(-1)), expected)
        assert torch.isinf(logits).sum() == (b * (~mask).sum() if shared else (~mask).sum())


def test_false_negative_masking_of_hard_negatives():
    b, k, d = 3, 2, 6
    q, p, n = unit(b, d), unit(b, d, seed=1), unit(b, k, d, seed=2).clone()
    n[1, 0] = p[1]  # mined "negative" of query 1 is its own ground truth (same document)
    pos_ids = ["d0", "d1", "d2"]
    neg_ids = [["x0", "x1"], ["d1", "x2"], ["x3", "x4"]]
    loss = InfoNCELoss(share_hard_negatives=False, in_batch_negatives=False)
    unmasked = loss(q, p, n)
    masked = loss(q, p, n, pos_doc_ids=pos_ids, neg_doc_ids=neg_ids)
    assert masked < unmasked  # the positive no longer competes with a copy of itself
    keep = torch.ones(b, k, dtype=torch.bool)
    keep[1, 0] = False
    torch.testing.assert_close(masked, loss(q, p, n, neg_mask=keep))  # = dropping that negative
    # Row 1's logits: the duplicate is -inf, the target is finite.
    logits, _ = loss.compute_logits(q, p, n, pos_doc_ids=pos_ids, neg_doc_ids=neg_ids)
    assert math.isinf(logits[1, 1].item()) and torch.isfinite(logits[1, 0])
    # Shared: the duplicate is masked for query 1 only; it stays a negative of queries 0 and 2.
    shared = InfoNCELoss()
    logits, _ = shared.compute_logits(q, p, n, pos_doc_ids=pos_ids, neg_doc_ids=neg_ids)
    col = b + 1 * k + 0
    assert math.isinf(logits[1, col].item())
    assert torch.isfinite(logits[[0, 2], col]).all()
    # Int tensor ids give the same result as strings; -1 / None mean unknown.
    ids = torch.tensor([0, 1, 2])
    neg_int = torch.tensor([[10, 11], [1, -1], [12, 13]])
    torch.testing.assert_close(
        shared(q, p, n, pos_doc_ids=ids, neg_doc_ids=neg_int),
        shared(q, p, n, pos_doc_ids=pos_ids, neg_doc_ids=neg_ids),
    )


def test_false_negative_masking_of_in_batch_duplicates():
    b, d = 4, 6
    q, p = unit(b, d), unit(b, d, seed=1).clone()
    p[3] = p[0]  # queries 0 and 3 share their positive document
    loss = InfoNCELoss(temperature=0.1)
    logits, target = loss.compute_logits(q, p, pos_doc_ids=["a", "b", "c", "a"])
    assert math.isinf(logits[0, 3].item()) and math.isinf(logits[3, 0].item())
    assert torch.isfinite(logits[0, 0]) and torch.isfinite(logits[3, 3])
    assert torch.isinf(logits).sum() == 2
    raw = (q @ p.T) / 0.1
    rows = []
    for i in range(b):
        cols = [j for j in range(b) if {i, j} != {0, 3}]
        rows.append(F.cross_entropy(raw[i, cols][None], torch.tensor([cols.index(i)])))
    masked = loss(q, p, pos_doc_ids=["a", "b", "c", "a"])
    torch.testing.assert_close(masked, torch.stack(rows).mean())
    assert masked < loss(q, p)


def test_masked_logits_get_zero_gradient_and_no_nan():
    b, k, d = 3, 2, 6
    q = unit(b, d).requires_grad_()
    p, n = unit(b, d, seed=1), unit(b, k, d, seed=2).requires_grad_()
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    InfoNCELoss()(q, p, n, neg_mask=mask).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(n.grad).all()
    assert (n.grad[~mask] == 0).all()


def test_half_precision_embeddings_give_float32_logits():
    q, p = unit(4, 8, dtype=torch.bfloat16), unit(4, 8, seed=1, dtype=torch.bfloat16)
    logits, _ = InfoNCELoss().compute_logits(q, p)
    assert logits.dtype == torch.float32
    assert torch.isfinite(InfoNCELoss()(q, p))


def test_normalize_option():
    q, p = unit(4, 8) * 3.0, unit(4, 8, seed=1) * 0.5
    torch.testing.assert_close(
        InfoNCELoss(normalize=True)(q, p), InfoNCELoss()(unit(4, 8), unit(4, 8, seed=1))
    )


# --- GradCache ----------------------------------------------------------------------------------

B, K, DIN, DOUT, MB = 32, 2, 12, 8, 4


def mlp(seed, dropout=0.0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(DIN, 24), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers += [torch.nn.Linear(24, DOUT)]
    return torch.nn.Sequential(*layers).double()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, DIN, generator=g, dtype=torch.float64)
    c = torch.randn(B, DIN, generator=g, dtype=torch.float64)
    n = torch.randn(B * K, DIN, generator=g, dtype=torch.float64)
    return q, c, n


def grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def zero(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def assert_grads_close(a, b, atol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-8)


def loss_kwargs():
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[::5, 1] = False  # some queries have one negative only
    pos = list(range(B))
    pos[7] = 3  # queries 3 and 7 share their positive document
    neg = torch.arange(100, 100 + B * K).reshape(B, K)
    neg[10, 0] = 10  # a mined negative that is query 10's ground truth
    return {"neg_mask": mask, "pos_doc_ids": torch.tensor(pos), "neg_doc_ids": neg}


def test_gradcache_equals_full_batch_deterministic_encoder():
    enc_q, enc_c = mlp(0), mlp(1)
    q, c, n = data()
    loss_fn = InfoNCELoss(temperature=0.05)
    kw = loss_kwargs()

    full = loss_fn(enc_q(q), enc_c(c), enc_c(n), **kw)
    full.backward()
    expected = grads(enc_q, enc_c)
    zero(enc_q, enc_c)

    got = gradcache_step(enc_q, enc_c, q, c, loss_fn, MB, negatives=n, loss_kwargs=kw)
    assert not got.requires_grad
    torch.testing.assert_close(got, full.detach(), atol=1e-12, rtol=1e-10)
    assert_grads_close(grads(enc_q, enc_c), expected)


def test_gradcache_shared_encoder_uneven_chunks_and_float32():
    enc = mlp(2).float()
    q, c, _ = (x[:30].float() for x in data(1))
    loss_fn = InfoNCELoss()
    full = loss_fn(enc(q), enc(c))
    full.backward()
    expected = grads(enc)
    zero(enc)
    got = GradCache(enc, loss_fn, mini_batch=4)(q, c)  # 30 = 7 x 4 + 2
    torch.testing.assert_close(got, full.detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(enc), expected, atol=1e-4)


def chunked_reference(enc, groups, loss_fn, mb, seed, **kw):
    """The plain computation, with grad, encoded in the same mini-batches and order as GradCache."""
    torch.manual_seed(seed)
    reps = [torch.cat([enc(x[i : i + mb]) for i in range(0, len(x), mb)]) for x in groups]
    loss = loss_fn(*reps, **kw)
    loss.backward()
    return loss.detach(), torch.get_rng_state()


def test_gradcache_with_dropout_restores_rng_state():
    enc = mlp(3, dropout=0.3)
    q, c, n = data(2)
    loss_fn = InfoNCELoss(temperature=0.05)
    kw = loss_kwargs()

    ref_loss, ref_rng = chunked_reference(enc, (q, c, n), loss_fn, MB, seed=123, **kw)
    expected = grads(enc)
    zero(enc)

    torch.manual_seed(123)
    got = GradCache(enc, loss_fn, MB)(q, c, n, **kw)
    torch.testing.assert_close(got, ref_loss, atol=1e-12, rtol=1e-10)
    assert_grads_close(grads(enc), expected)
    # The global RNG ends where the plain computation leaves it (the re-encoding is invisible).
    assert torch.equal(torch.get_rng_state(), ref_rng)

    # Without the restore the re-encoding draws other dropout masks: the gradients are wrong.
    zero(enc)
    torch.manual_seed(123)
    GradCache(enc, loss_fn, MB, preserve_rng_state=False)(q, c, n, **kw)
    wrong = grads(enc)
    assert max((a - b).abs().max().item() for a, b in zip(wrong, expected, strict=True)) > 1e-3


def test_gradcache_with_dropout_equals_full_batch_in_eval_mode():
    enc = mlp(4, dropout=0.3).eval()
    q, c, _ = data(3)
    loss_fn = InfoNCELoss()
    loss_fn(enc(q), enc(c)).backward()
    expected = grads(enc)
    zero(enc)
    GradCache(enc, loss_fn, MB)(q, c)
    assert_grads_close(grads(enc), expected)


def test_gradcache_input_forms_give_the_same_gradients():
    enc = mlp(5, dropout=0.2)
    q, c, _ = data(4)
    loss_fn = InfoNCELoss(temperature=0.1)
    ref_loss, _ = chunked_reference(enc, (q, c), loss_fn, MB, seed=7)
    expected = grads(enc)

    def by_dict(batch):
        assert set(batch) == {"x", "scale", "ids"} and batch["scale"] == 1.0
        assert len(batch["ids"]) == len(batch["x"])
        return enc(batch["x"] * batch["scale"])

    forms = {
        "dict": (
            by_dict,
            ({"x": q, "scale": 1.0, "ids": list(range(B))}, {"x": c, "scale": 1.0, "ids": list(range(B))}),
        ),
        "minibatches": (enc, (MiniBatches(list(q.split(MB))), MiniBatches(list(c.split(MB))))),
        "list": (lambda rows: enc(torch.stack(rows)), (list(q.unbind()), list(c.unbind()))),
    }
    for name, (fn, inputs) in forms.items():
        zero(enc)
        torch.manual_seed(7)
        got = GradCache(fn, loss_fn, MB)(*inputs)
        torch.testing.assert_close(got, ref_loss, atol=1e-12, rtol=1e-10, msg=name)
        assert_grads_close(grads(enc), expected)

    # A callable encoding an index range: int N or range(N).
    zero(enc)
    torch.manual_seed(7)
    fns = [lambda s, e: enc(q[s:e]), lambda s, e: enc(c[s:e])]
    got = GradCache(fns, loss_fn, MB)(B, range(B))
    torch.testing.assert_close(got, ref_loss, atol=1e-12, rtol=1e-10)
    assert_grads_close(grads(enc), expected)


def test_gradcache_accumulates_and_reaches_loss_parameters():
    class LearnedTemperature(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0), dtype=torch.float64))

        def forward(self, q, p):
            return F.cross_entropy(q @ p.T * self.log_scale.exp(), torch.arange(len(q)))

    enc, loss_fn = mlp(6), LearnedTemperature()
    q, c, _ = data(5)
    loss_fn(enc(q), enc(c)).backward()
    loss_fn(enc(q), enc(c)).backward()  # two steps of accumulation
    expected = grads(enc, loss_fn)
    zero(enc, loss_fn)
    gc = GradCache(enc, loss_fn, mini_batch=8)
    gc(q, c)
    gc(q, c)
    assert_grads_close(grads(enc, loss_fn), expected)


def test_gradcache_frozen_encoder_and_bad_outputs():
    enc_q, enc_c = mlp(7), mlp(8)
    enc_c.requires_grad_(False)  # frozen candidate tower
    q, c, _ = data(6)
    loss_fn = InfoNCELoss()
    loss_fn(enc_q(q), enc_c(c)).backward()
    expected = grads(enc_q)
    zero(enc_q)
    gradcache_step(enc_q, enc_c, q, c, loss_fn, MB)
    assert_grads_close(grads(enc_q), expected)
    assert all(p.grad is None for p in enc_c.parameters())

    with pytest.raises(ValueError, match="returned"):
        GradCache(lambda x: enc_q(x)[:1], loss_fn, MB)(q, c)
    with pytest.raises(ValueError, match="batch size"):
        GradCache(enc_q, loss_fn, MB)({"a": q, "b": c[:5]}, c)
    with pytest.raises(ValueError, match="encode_fns"):
        GradCache([enc_q, enc_c], loss_fn, MB)(q, c, c)
    with pytest.raises(ValueError):
        GradCache(enc_q, loss_fn, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gradcache_with_dropout_on_cuda_restores_cuda_rng_state():
    dev = torch.device("cuda")
    enc = mlp(9, dropout=0.3).to(dev)
    q, c, n = (x.to(dev) for x in data(7))
    loss_fn = InfoNCELoss(temperature=0.05)
    kw = {k: v.to(dev) for k, v in loss_kwargs().items()}

    torch.manual_seed(11)
    reps = [torch.cat([enc(x[i : i + MB]) for i in range(0, len(x), MB)]) for x in (q, c, n)]
    ref_loss = loss_fn(*reps, **kw)
    ref_loss.backward()
    ref_rng = torch.cuda.get_rng_state()
    expected = grads(enc)
    zero(enc)

    torch.manual_seed(11)
    got = GradCache(enc, loss_fn, MB)(q, c, n, **kw)
    torch.testing.assert_close(got, ref_loss.detach(), atol=1e-12, rtol=1e-10)
    assert_grads_close(grads(enc), expected)
    assert torch.equal(torch.cuda.get_rng_state(), ref_rng)

    zero(enc)
    torch.manual_seed(11)
    GradCache(enc, loss_fn, MB, preserve_rng_state=False)(q, c, n, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(grads(enc), expected, strict=True)) > 1e-3
