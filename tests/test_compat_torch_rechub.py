"""mind_kernels.compat.torch_rechub.CapsuleNetwork against torch-rechub's own layer and models.

Same seed -> same initial logits -> outputs and every gradient equal to float32 tolerance,
for the three bilinear types and routing_times 1..4 (the quirky schedules included);
state_dicts load both ways; patch() makes torch-rechub's MIND / ComirecDR use our layer
and leaves a training step's loss and gradients unchanged; unpatch() restores.
"""

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_rechub")

import torch_rechub.basic.layers as rechub_layers  # noqa: E402
from torch_rechub.basic.features import SequenceFeature, SparseFeature  # noqa: E402
from torch_rechub.basic.initializers import RandomNormal  # noqa: E402
from torch_rechub.models.matching import comirec as rechub_comirec  # noqa: E402
from torch_rechub.models.matching import mind as rechub_mind  # noqa: E402

import mind_kernels  # noqa: E402
from mind_kernels.compat import torch_rechub as compat  # noqa: E402
from mind_kernels.compat.torch_rechub import CapsuleNetwork  # noqa: E402

RechubCapsule = rechub_layers.CapsuleNetwork
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _never_leave_patched():
    yield
    compat.unpatch()
    assert rechub_layers.CapsuleNetwork is RechubCapsule


def _mask(B, L, dtype):
    """Row 0 full, row 1 padded after 2, row 2 all padding, later rows random (at least one valid)."""
    g = torch.Generator().manual_seed(B * 100 + L)
    m = (torch.rand(B, L, generator=g) > 0.4).long()
    m[:, 0] = 1
    m[0] = 1
    m[1, 2:] = 0
    m[2] = 0
    return m.to(dtype)


def _pair(bilinear_type, seq_len, dim, K, r, relu):
    """torch-rechub's layer and ours, with identical parameters (type 2's w drawn explicitly)."""
    theirs = RechubCapsule(dim, seq_len, bilinear_type, K, r, relu_layer=relu)
    if bilinear_type not in (0, 1):
        with torch.no_grad():
            theirs.w.normal_(0.0, 0.5)  # torch-rechub leaves it uninitialised
    ours = CapsuleNetwork(dim, seq_len, bilinear_type, K, r, relu_layer=relu)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run(layer, E, mask, probe, seed):
    """Forward under ``seed``; then d(sum(out * probe)) w.r.t. E and every parameter (None: no gradient)."""
    x = E.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = layer(x, mask)
    grads = {}
    if out.requires_grad:
        (out * probe).sum().backward()
    grads["input"] = x.grad
    for name, p in layer.named_parameters():
        grads[name] = p.grad
    return out.detach(), out.requires_grad, grads


def _assert_same(theirs_result, ours_result):
    (o1, rg1, g1), (o2, rg2, g2) = theirs_result, ours_result
    torch.testing.assert_close(o2, o1, atol=ATOL, rtol=RTOL)
    assert rg1 == rg2
    assert g1.keys() == g2.keys()
    for name in g1:
        if g1[name] is None:
            assert g2[name] is None, f"{name}: torch-rechub gives no gradient, ours does"
        else:
            assert g2[name] is not None, f"{name}: ours gives no gradient"
            torch.testing.assert_close(g2[name], g1[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


CASES = [  # (B, L, D, K, mask dtype)
    (4, 5, 6, 3, torch.long),
    (7, 9, 5, 4, torch.bool),
    (3, 1, 8, 2, torch.float32),
]


@pytest.mark.parametrize("bilinear_type", [0, 1, 2])
@pytest.mark.parametrize("routing_times", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{c[1]}D{c[2]}K{c[3]}-{str(c[4])[6:]}")
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
def test_matches_torch_rechub(bilinear_type, routing_times, case, relu):
    B, L, D, K, mdtype = case
    torch.manual_seed(1234)
    theirs, ours = _pair(bilinear_type, L, D, K, routing_times, relu)
    E = torch.randn(B, L, D)
    mask = _mask(B, L, mdtype)
    probe = torch.randn(B, K, D)
    ref = _run(theirs, E, mask, probe, seed=7)
    got = _run(ours, E, mask, probe, seed=7)
    _assert_same(ref, got)
    # The schedule quirk: r = 1, 2 give the routing map no gradient, r >= 3 does.
    map_name = "w" if bilinear_type == 2 else "linear.weight"
    assert (got[2][map_name] is None) == (routing_times < 3)
    # The user without behaviours gets zero capsules (before the relu layer).
    if not relu:
        assert torch.all(got[0][2] == 0)


def _fused_backends():
    table = mind_kernels.backends()
    return [s.name for s in table if s.name in ("cpp",) and s.available.get("cpu") is None]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("bilinear_type", [0, 1])
@pytest.mark.parametrize("routing_times", [2, 3])
def test_matches_torch_rechub_on_each_backend(backend, bilinear_type, routing_times):
    """The same equality with the backend named explicitly, so the fused C++ kernels are exercised."""
    if backend not in ["reference"] + _fused_backends():
        pytest.skip(f"{backend} backend not built")
    torch.manual_seed(99)
    theirs, _ = _pair(bilinear_type, 11, 7, 4, routing_times, False)
    ours = CapsuleNetwork(7, 11, bilinear_type, 4, routing_times, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    E, mask, probe = torch.randn(9, 11, 7), _mask(9, 11, torch.long), torch.randn(9, 4, 7)
    _assert_same(_run(theirs, E, mask, probe, 4), _run(ours, E, mask, probe, 4))


@pytest.mark.parametrize("bilinear_type", [0, 1, 2])
def test_matches_torch_rechub_without_stop_grad(bilinear_type):
    """stop_grad = False (an attribute in torch-rechub) differentiates through every round."""
    for r in (2, 3):
        torch.manual_seed(5)
        theirs, ours = _pair(bilinear_type, 6, 4, 3, r, False)
        theirs.stop_grad = ours.stop_grad = False
        E, mask, probe = torch.randn(5, 6, 4), _mask(5, 6, torch.long), torch.randn(5, 3, 4)
        _assert_same(_run(theirs, E, mask, probe, 3), _run(ours, E, mask, probe, 3))


def test_r_above_three_equals_three():
    torch.manual_seed(0)
    a = CapsuleNetwork(4, 6, 0, 3, routing_times=3)
    b = CapsuleNetwork(4, 6, 0, 3, routing_times=7)
    b.load_state_dict(a.state_dict())
    E, mask, probe = torch.randn(3, 6, 4), _mask(3, 6, torch.long), torch.randn(3, 3, 4)
    _assert_same(_run(a, E, mask, probe, 1), _run(b, E, mask, probe, 1))


def test_mask_layouts_agree():
    torch.manual_seed(0)
    layer = CapsuleNetwork(5, 7, 0, 3)
    E = torch.randn(4, 7, 5)
    m = _mask(4, 7, torch.long)
    outs = []
    for mask in (m, m.bool(), m.float(), m[..., None], m[..., None].float()):
        torch.manual_seed(11)
        outs.append(layer(E, mask))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=0, rtol=0)
    torch.manual_seed(11)
    assert not torch.equal(layer(E, torch.ones_like(m)), outs[0])  # the mask matters
    torch.testing.assert_close(_seeded(layer, E, None, 11), _seeded(layer, E, torch.ones_like(m), 11))
    with pytest.raises(ValueError, match="mask"):
        layer(E, m[:, :5])


def _seeded(layer, E, mask, seed):
    torch.manual_seed(seed)
    return layer(E, mask)


@pytest.mark.parametrize("bilinear_type", [0, 1, 2])
def test_state_dict_both_ways(bilinear_type):
    D, L, K = 6, 5, 3
    torch.manual_seed(0)
    theirs = RechubCapsule(D, L, bilinear_type, K)
    if bilinear_type == 2:
        with torch.no_grad():
            theirs.w.normal_()
    ours = CapsuleNetwork(D, L, bilinear_type, K, fix_quirks=True)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_t.keys()) == list(sd_o.keys())
    assert {k: v.shape for k, v in sd_t.items()} == {k: v.shape for k, v in sd_o.items()}
    expected = {"relu.0.weight": (D, D)}
    expected.update({0: {"linear.weight": (D, D)}, 1: {"linear.weight": (K * D, D)},
                     2: {"w": (1, L, K * D, D)}}[bilinear_type])
    assert {k: tuple(v.shape) for k, v in sd_o.items()} == expected

    ours.load_state_dict(sd_t)  # theirs -> ours (strict)
    for k in sd_t:
        assert torch.equal(ours.state_dict()[k], sd_t[k])
    fresh = RechubCapsule(D, L, bilinear_type, K)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    fresh.load_state_dict(ours.state_dict())  # ours -> theirs (strict)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)

    converted = compat.from_torch_rechub(theirs)
    assert converted.bilinear_type == bilinear_type and converted.interest_num == K
    for k in sd_t:
        assert torch.equal(converted.state_dict()[k], sd_t[k])


@pytest.mark.parametrize("bilinear_type", [0, 1, 2])
def test_same_initialisation_and_rng_use_under_one_seed(bilinear_type):
    torch.manual_seed(42)
    theirs = RechubCapsule(8, 4, bilinear_type, 2)
    after_theirs = torch.rand(3)
    torch.manual_seed(42)
    ours = CapsuleNetwork(8, 4, bilinear_type, 2)
    after_ours = torch.rand(3)
    assert torch.equal(after_theirs, after_ours)  # the same random numbers were consumed
    for (n1, p1), (n2, p2) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert n1 == n2
        if n1 != "w":  # w is uninitialised memory in both
            assert torch.equal(p1, p2)


def test_init_weight_flag():
    torch.manual_seed(0)
    layer = CapsuleNetwork(16, 5, 2, 3, init_weight=True)
    assert torch.isfinite(layer.w).all()
    assert layer.w.abs().max() <= 0.25 and layer.w.std() > 0.1  # U(-1/4, 1/4): std 0.144
    assert CapsuleNetwork(16, 5, 2, 3, fix_quirks=True).init_weight
    assert not CapsuleNetwork(16, 5, 2, 3, fix_quirks=True, init_weight=False).init_weight
    assert not CapsuleNetwork(16, 5, 2, 3).init_weight


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_standard_routing_is_the_ops_r_iterations(r):
    """standard_routing: r-1 update rounds + a final round with gradient = b2i_routing(num_iters=r)."""
    torch.manual_seed(0)
    layer = CapsuleNetwork(5, 6, 0, 3, routing_times=r, standard_routing=True)
    E, mask, probe = torch.randn(4, 6, 5), _mask(4, 6, torch.long), torch.randn(4, 3, 5)
    got = _run(layer, E, mask, probe, seed=9)
    torch.manual_seed(9)
    b0 = torch.randn(4, 3, 6)
    x = E.clone().requires_grad_(True)
    S = layer.linear.weight.detach().clone().requires_grad_(True)
    want = mind_kernels.b2i_routing(x, S, b0, mask, num_iters=r, softmax_over="behaviors", backend="reference")
    (want * probe).sum().backward()
    torch.testing.assert_close(got[0], want.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[2]["input"], x.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[2]["linear.weight"], S.grad, atol=ATOL, rtol=RTOL)
    # How torch-rechub's schedule differs: r < 3 same values but no gradient; r > 3 stops at 3.
    default = CapsuleNetwork(5, 6, 0, 3, routing_times=r)
    default.load_state_dict(layer.state_dict())
    quirky = _run(default, E, mask, probe, seed=9)
    assert quirky[1] == (r >= 3) and got[1]
    if r <= 3:
        torch.testing.assert_close(quirky[0], got[0], atol=ATOL, rtol=RTOL)
    else:
        assert not torch.allclose(quirky[0], got[0], atol=1e-4)


@pytest.mark.parametrize("bilinear_type", [0, 1, 2])
def test_exclude_padding_equals_the_unpadded_history(bilinear_type):
    """exclude_padding: a padded user routes exactly like the same history without the padding."""
    torch.manual_seed(0)
    D, K, n, L = 4, 2, 3, 6
    padded = CapsuleNetwork(D, L, bilinear_type, K, exclude_padding=True, init_weight=True)
    short = CapsuleNetwork(D, n, bilinear_type, K)
    sd = padded.state_dict()
    if bilinear_type == 2:
        sd = {**sd, "w": sd["w"][:, :n]}
    short.load_state_dict(sd)
    E = torch.randn(2, L, D)
    mask = torch.zeros(2, L, dtype=torch.long)
    mask[:, :n] = 1
    torch.manual_seed(3)
    b0 = torch.randn(2, K, L)  # type 0 draws (B, K, L); the first n positions' logits must line up
    out_padded = _seeded(padded, E, mask, 3)
    if bilinear_type == 0:
        want = mind_kernels.b2i_routing(E[:, :n], short.linear.weight, b0[:, :, :n], softmax_over="behaviors")
    else:
        want = _seeded(short, E[:, :n], torch.ones(2, n, dtype=torch.long), 3)
    torch.testing.assert_close(out_padded, want, atol=ATOL, rtol=RTOL)
    # torch-rechub's default puts the padding in the softmax denominator: a different answer.
    quirky = CapsuleNetwork(D, L, bilinear_type, K)
    quirky.load_state_dict(padded.state_dict())
    assert not torch.allclose(_seeded(quirky, E, mask, 3), out_padded, atol=1e-4)


def test_types_0_and_1_are_served_by_the_op(monkeypatch):
    calls = []
    real = compat.b2i_routing

    def counting(*args, **kwargs):
        calls.append(kwargs.get("softmax_over"))
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, "b2i_routing", counting)
    E = torch.randn(2, 5, 4)
    CapsuleNetwork(4, 5, 0, 3)(E, torch.ones(2, 5))
    assert calls == ["behaviors"]
    CapsuleNetwork(4, 5, 1, 3)(E, torch.ones(2, 5))
    assert calls == ["behaviors"] * 4  # one one-interest routing per interest


def test_backend_argument_and_errors():
    E, mask = torch.randn(2, 5, 4), torch.ones(2, 5)
    torch.manual_seed(0)
    layer = CapsuleNetwork(4, 5, 0, 3, backend="reference")
    assert layer(E, mask).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="backend"):
        CapsuleNetwork(4, 5, 0, 3, backend="tpu")(E, mask)
    with pytest.raises(ValueError, match="seq_len=5"):
        layer(torch.randn(2, 6, 4), torch.ones(2, 6))
    layer.routing_times = 0
    with pytest.raises(ValueError, match="routing_times"):
        layer(E, mask)
    with pytest.raises(TypeError):
        CapsuleNetwork(4, 5, 0, 3, True, False, True)  # the extra flags are keyword-only


# ---------------------------------------------------------------------- patch() / models


def test_patch_unpatch_idempotent_and_context_manager():
    assert not compat.is_patched()
    cls = compat.patch()
    assert cls is CapsuleNetwork
    for module in (rechub_layers, rechub_mind, rechub_comirec):
        assert module.CapsuleNetwork is CapsuleNetwork
    assert compat.patch() is CapsuleNetwork  # twice: still ours, one unpatch restores
    assert compat.unpatch() is True
    for module in (rechub_layers, rechub_mind, rechub_comirec):
        assert module.CapsuleNetwork is RechubCapsule
    assert compat.unpatch() is False
    assert compat.CapsuleNetwork is CapsuleNetwork  # our own module is never touched

    # A module that imported torch-rechub's class by name (like user code) is patched too.
    fake = type(sys)("_fake_user_module")
    fake.CapsuleNetwork = RechubCapsule
    sys.modules[fake.__name__] = fake
    try:
        with compat.patched(backend="reference", fix_quirks=True) as configured:
            assert fake.CapsuleNetwork is configured and rechub_mind.CapsuleNetwork is configured
            layer = rechub_mind.CapsuleNetwork(4, 5, bilinear_type=0, interest_num=2)
            assert isinstance(layer, CapsuleNetwork)
            assert layer.backend == "reference" and layer.standard_routing
            assert not rechub_mind.CapsuleNetwork(4, 5, 0, 2, fix_quirks=False).standard_routing
            with compat.patched():
                assert rechub_mind.CapsuleNetwork is CapsuleNetwork
            assert rechub_mind.CapsuleNetwork(4, 5, 0, 2).backend == "reference"  # outer state is back
        assert fake.CapsuleNetwork is RechubCapsule and rechub_mind.CapsuleNetwork is RechubCapsule
    finally:
        del sys.modules[fake.__name__]
    with pytest.raises(TypeError, match="unknown"):
        compat.patch(bilinear_type=0)
    assert not compat.is_patched()


def _features(D, n_items, n_users):
    init = RandomNormal(0.0, 1.0)  # torch-rechub's default (std 1e-4) makes every capsule ~0
    user = [SparseFeature("user_id", n_users, embed_dim=D, initializer=init)]
    history = [SequenceFeature("hist_item_id", n_items, embed_dim=D, pooling="concat", shared_with="item_id",
                               initializer=init)]
    item = [SparseFeature("item_id", n_items, embed_dim=D, initializer=init)]
    neg = [SequenceFeature("neg_items", n_items, embed_dim=D, pooling="concat", shared_with="item_id",
                           initializer=init)]
    return user, history, item, neg


def _batch(B, L, n_items, n_users, n_neg, seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, n_items, (B, L), generator=g)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0], lengths[1] = L, 0  # a full history and an empty one
    hist = hist * (torch.arange(L)[None, :] < lengths[:, None])  # 0 = padding, as torch-rechub pads
    return {
        "user_id": torch.randint(0, n_users, (B,), generator=g),
        "hist_item_id": hist,
        "item_id": torch.randint(1, n_items, (B,), generator=g),
        "neg_items": torch.randint(1, n_items, (B, n_neg), generator=g),
    }


def _train_step(model_cls, patched_run, seed=0, **kwargs):
    B, L, D, K, n_items, n_users, n_neg = 6, 7, 8, 3, 40, 10, 4
    ctx = compat.patched() if patched_run else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(seed)
        model = model_cls(*_features(D, n_items, n_users), max_length=L, interest_num=K, **kwargs)
        if hasattr(model.capsule, "w"):
            with torch.no_grad():  # ComirecDR's uninitialised map: give both runs the same numbers
                model.capsule.w.copy_(torch.randn(model.capsule.w.shape, generator=torch.Generator().manual_seed(1)))
    assert isinstance(model.capsule, CapsuleNetwork) == patched_run
    x = _batch(B, L, n_items, n_users, n_neg)
    torch.manual_seed(seed + 1)
    y = model(x)  # (B, 1 + n_neg) scores, positive first
    loss = F.cross_entropy(y / 0.1, torch.zeros(B, dtype=torch.long))
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name,kwargs", [("MIND", {}), ("MIND", {"dynamic_interest": True}), ("ComirecDR", {})])
def test_rechub_model_training_step_unchanged_by_patch(model_name, kwargs):
    model_cls = {"MIND": rechub_mind.MIND, "ComirecDR": rechub_comirec.ComirecDR}[model_name]
    m1, loss1, g1 = _train_step(model_cls, False, **kwargs)
    m2, loss2, g2 = _train_step(model_cls, True, **kwargs)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # one seed, one initialisation, with or without patch
    assert torch.isfinite(loss1) and loss1 > 0
    torch.testing.assert_close(loss2, loss1, atol=ATOL, rtol=RTOL)
    assert g1.keys() == g2.keys()
    capsule_map = "capsule.w" if model_name == "ComirecDR" else "capsule.linear.weight"
    assert g1[capsule_map] is not None and g1[capsule_map].abs().sum() > 0  # the routing layer is trained
    for name in g1:
        if g1[name] is None:
            assert g2[name] is None, name
        else:
            torch.testing.assert_close(g2[name], g1[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
