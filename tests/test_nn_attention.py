"""fastattn.nn.MultiheadAttention and the Transformer layers against torch's modules with the same weights.

float64 throughout, so "identical" means equal within rtol 1e-9 / atol 1e-10. Where torch gives NaN (a query row with
nothing to attend to) we compare the other rows and check ours is finite there.
"""
import pytest
import torch
import torch.nn.functional as F

import fastattn.nn as fnn
import fastattn.nn.attention as fattn_module

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:fastattn\.attention. falling back"),  # until the cpu kernel is merged
    pytest.mark.filterwarnings("ignore:Support for mismatched"),  # mixed bool/float masks are tested on purpose
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),  # torch's, about its own fast path
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),  # torch's encoder fast path
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: threads only add synchronisation (and this machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
E, H = 12, 3  # head size 4


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------
def mha_pair(seed=0, **kw):
    """torch's module with random weights (biases too) and ours with the same (loads torch's state_dict)."""
    torch.manual_seed(seed)
    ref = randomize(torch.nn.MultiheadAttention(E, H, dtype=DT, **kw))
    ours = fnn.MultiheadAttention(E, H, dtype=DT, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def set_mode(training, *modules):
    for m in modules:
        m.train(training)


def randomize(module, seed=1):
    """Random values everywhere (biases too), so a missing bias term cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def seq(L, B, dim, batch_first, batched=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not batched:
        return torch.randn(L, dim, generator=g, dtype=DT)
    shape = (B, L, dim) if batch_first else (L, B, dim)
    return torch.randn(shape, generator=g, dtype=DT)


def make_masks(kind, B, L, S, batched=True, seed=0):
    """(attn_mask, key_padding_mask) of one kind; every query row keeps key 0 visible."""
    g = torch.Generator().manual_seed(seed)
    attn, kpm = None, None
    if kind in ("attn_bool", "both_bool", "attn_bool_kpm_float"):
        attn = torch.rand(L, S, generator=g) < 0.4
        attn[:, 0] = False
    if kind in ("attn_float", "both_float", "attn_float_kpm_bool"):
        attn = torch.randn(L, S, generator=g, dtype=DT)
        attn[torch.rand(L, S, generator=g) < 0.3] = float("-inf")
        attn[:, 0] = 0.0
    if kind == "attn3d_bool":
        attn = torch.rand(B * H if batched else H, L, S, generator=g) < 0.4
        attn[..., 0] = False
    if kind == "attn3d_float":
        attn = torch.randn(B * H if batched else H, L, S, generator=g, dtype=DT)
    if kind in ("kpm_bool", "both_bool", "attn_float_kpm_bool"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, S // 2:] = True
        kpm[-1, -1] = True
    if kind in ("kpm_float", "both_float", "attn_bool_kpm_float"):
        kpm = torch.randn(B, S, generator=g, dtype=DT)
        kpm[0, S // 2:] = float("-inf")
    if kpm is not None and not batched:
        kpm = kpm[0]
    return attn, kpm


def assert_close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or TOL))


MASK_KINDS = ["none", "attn_bool", "attn_float", "attn3d_bool", "attn3d_float", "kpm_bool", "kpm_float",
              "both_bool", "both_float", "attn_bool_kpm_float", "attn_float_kpm_bool"]
CONFIGS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 5, "vdim": 7},
}


# --------------------------------------------------------------------------------------------
# MultiheadAttention: parameters, state_dict, init.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_mha_same_parameters_and_init_as_torch(cfg):
    torch.manual_seed(3)
    ref = torch.nn.MultiheadAttention(E, H, **CONFIGS[cfg])
    torch.manual_seed(3)
    ours = fnn.MultiheadAttention(E, H, **CONFIGS[cfg])
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_ours[k]), k  # same seed, same init order -> same weights
    assert type(ours.out_proj) is type(ref.out_proj)
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first",
                 "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


@pytest.mark.parametrize("cfg", ["default", "bias_kv_zero_attn", "kdim_vdim", "no_bias"])
def test_mha_state_dict_round_trip_both_ways(cfg):
    kw = CONFIGS[cfg]
    ref = randomize(torch.nn.MultiheadAttention(E, H, dtype=DT, **kw), seed=5)
    ours = fnn.MultiheadAttention(E, H, dtype=DT, **kw)
    ours.load_state_dict(ref.state_dict())  # strict
    q = seq(4, 2, E, False)
    k = seq(6, 2, kw.get("kdim", E), False, seed=1)
    v = seq(6, 2, kw.get("vdim", E), False, seed=2)
    assert_close(ours(q, k, v)[0], ref(q, k, v)[0])
    # and back: ours -> a fresh torch module
    randomize(ours, seed=6)
    back = torch.nn.MultiheadAttention(E, H, dtype=DT, **kw)
    back.load_state_dict(ours.state_dict())
    assert_close(back(q, k, v)[0], ours(q, k, v)[0])


# --------------------------------------------------------------------------------------------
# MultiheadAttention: outputs vs torch.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_mha_self_attention_matches_torch(mask_kind, layout, need_weights, average):
    batch_first, batched = layout == "batch_first", layout != "unbatched"
    ref, ours = mha_pair(batch_first=batch_first)
    set_mode(False, ref, ours)
    B, L = 3, 7
    x = seq(L, B, E, batch_first, batched)
    attn, kpm = make_masks(mask_kind, B, L, L, batched)
    kw = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, average_attn_weights=average)
    out_ref, w_ref = ref(x, x, x, **kw)
    out, w = ours(x, x, x, **kw)
    assert out.shape == out_ref.shape
    assert_close(out, out_ref)
    if need_weights:
        assert w.shape == w_ref.shape
        assert_close(w, w_ref)
    else:
        assert w is None


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("mask_kind", ["none", "attn3d_float", "attn_bool_kpm_float"])
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_cross_attention_options_match_torch(cfg, mask_kind, layout, need_weights):
    """L != S, key is value and key is not value, every constructor option; training mode (dropout 0).
    Unbatched inputs here go to batch_first modules (torch ignores batch_first for them)."""
    kw = CONFIGS[cfg]
    batch_first, batched = layout in ("batch_first", "unbatched"), layout != "unbatched"
    ref, ours = mha_pair(batch_first=batch_first, **kw)
    set_mode(True, ref, ours)
    B, L, S = 2, 5, 9
    q = seq(L, B, E, batch_first, batched, seed=1)
    k = seq(S, B, kw.get("kdim", E), batch_first, batched, seed=2)
    v = k if "vdim" not in kw else seq(S, B, kw["vdim"], batch_first, batched, seed=3)
    attn, kpm = make_masks(mask_kind, B, L, S, batched)
    for value in (v, v.clone()):  # the shared-k/v projection and the separate one
        args = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, average_attn_weights=False)
        out_ref, w_ref = ref(q, k, value, **args)
        out, w = ours(q, k, value, **args)
        assert_close(out, out_ref)
        if need_weights:
            assert_close(w, w_ref)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("cfg", ["default", "bias_kv_zero_attn"])
@pytest.mark.parametrize("L,S", [(6, 6), (4, 7)])
def test_mha_is_causal_hint_matches_torch(need_weights, with_kpm, cfg, L, S):
    """torch: the hint replaces attn_mask only without key_padding_mask and need_weights (top-left causal)."""
    ref, ours = mha_pair(**CONFIGS[cfg])
    B = 2
    q, kv = seq(L, B, E, False, seed=1), seq(S, B, E, False, seed=2)
    mask = torch.ones(L, S, dtype=torch.bool).triu(1)  # True = masked out: causal, top-left
    _, kpm = make_masks("kpm_bool" if with_kpm else "none", B, L, S)
    kw = dict(attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights, is_causal=True)
    out_ref, w_ref = ref(q, kv, kv, **kw)
    out, w = ours(q, kv, kv, **kw)
    assert_close(out, out_ref)
    if need_weights:
        assert_close(w, w_ref)


def test_mha_is_causal_hint_uses_the_causal_kernel(monkeypatch):
    """With the hint and nothing else needing the mask, the kernel gets causal=True and no mask."""
    calls = []
    real = fattn_module._attend

    def spy(q, k, v, bias, dropout_p, causal, seed, backend):
        calls.append(dict(causal=causal, attn_mask=bias))
        return real(q, k, v, bias, dropout_p, causal, seed, backend)

    monkeypatch.setattr(fattn_module, "_attend", spy)
    ours = fnn.MultiheadAttention(E, H, dtype=DT)
    x = seq(5, 2, E, False)
    ours(x, x, x, attn_mask=fnn.Transformer.generate_square_subsequent_mask(5, dtype=DT),
         need_weights=False, is_causal=True)
    assert calls[-1]["causal"] is True and calls[-1]["attn_mask"] is None
    ours(x, x, x, attn_mask=fnn.Transformer.generate_square_subsequent_mask(5, dtype=DT), need_weights=False)
    assert calls[-1]["causal"] is False and calls[-1]["attn_mask"] is not None


def test_mha_is_causal_without_mask_raises_like_torch():
    ref, ours = mha_pair()
    x = seq(4, 2, E, False)
    for m in (ref, ours):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
            m(x, x, x, is_causal=True)


def test_mha_fully_masked_rows_give_zero_attention():
    """A query row with nothing to attend to: ours gives out_proj(0) = out_proj.bias, weights 0, finite
    gradients; torch gives NaN in that row (its other rows must agree with ours)."""
    ref, ours = mha_pair()
    B, L, S = 2, 4, 5
    q = seq(L, B, E, False, seed=1).requires_grad_()
    kv = seq(S, B, E, False, seed=2).requires_grad_()
    attn = torch.zeros(L, S, dtype=torch.bool)
    attn[1] = True  # query 1 sees nothing, in every batch entry
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1] = True  # batch entry 1 sees nothing at all
    for need_weights in (False, True):
        out_ref, w_ref = ref(q, kv, kv, attn_mask=attn, key_padding_mask=kpm, need_weights=need_weights)
        out, w = ours(q, kv, kv, attn_mask=attn, key_padding_mask=kpm, need_weights=need_weights)
        dead = torch.zeros(L, B, dtype=torch.bool)
        dead[1, :] = True
        dead[:, 1] = True
        assert torch.isfinite(out).all()
        assert_close(out[dead], ours.out_proj.bias.detach().expand(int(dead.sum()), E))
        assert_close(out[~dead], out_ref[~dead])
        if need_weights:
            dead_w = dead.t()  # weights are (B, L, S)
            assert (w[dead_w] == 0).all()
            assert_close(w[~dead_w], w_ref[~dead_w])
        q.grad = kv.grad = None
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all()
        assert (q.grad[:, 1] == 0).all()  # batch entry 1's queries influence nothing


# --------------------------------------------------------------------------------------------
# MultiheadAttention: gradients vs torch.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,batch_first", [("default", False), ("no_bias", True), ("bias_kv_zero_attn", False),
                                              ("kdim_vdim", True)])
@pytest.mark.parametrize("mask_kind", ["none", "both_bool", "attn3d_float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_gradients_match_torch(cfg, batch_first, mask_kind, need_weights):
    kw = CONFIGS[cfg]
    ref, ours = mha_pair(batch_first=batch_first, **kw)
    set_mode(True, ref, ours)
    B, L, S = 2, 5, 6
    inputs = [seq(L, B, E, batch_first, seed=1), seq(S, B, kw.get("kdim", E), batch_first, seed=2),
              seq(S, B, kw.get("vdim", E), batch_first, seed=3)]
    attn, kpm = make_masks(mask_kind, B, L, S)
    g = torch.Generator().manual_seed(9)
    grads = []
    for m in (ref, ours):
        xs = [t.clone().requires_grad_() for t in inputs]
        out, w = m(*xs, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, average_attn_weights=False)
        g.manual_seed(9)
        loss = (out * torch.randn(out.shape, generator=g, dtype=DT)).sum()
        if need_weights:
            loss = loss + (w * torch.randn(w.shape, generator=g, dtype=DT)).sum()
        params = [p for _, p in m.named_parameters()]
        grads.append(torch.autograd.grad(loss, xs + params))
    for a, b in zip(*grads):
        assert_close(b, a)


# --------------------------------------------------------------------------------------------
# MultiheadAttention: the lean path (batched, packed in_proj, key is value, no weights).
# --------------------------------------------------------------------------------------------
def _spy_fast(monkeypatch):
    taken = []
    real = fnn.MultiheadAttention._fast_forward

    def spy(self, *args):
        taken.append(True)
        return real(self, *args)

    monkeypatch.setattr(fnn.MultiheadAttention, "_fast_forward", spy)
    return taken


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "attn_bool", "attn_float", "attn3d_bool", "kpm_bool", "kpm_float",
                                       "both_bool", "attn_float_kpm_bool", "causal_hint"])
@pytest.mark.parametrize("cfg", ["default", "no_bias"])
def test_mha_fast_path_outputs_and_gradients_match_torch(monkeypatch, batch_first, cross, mask_kind, cfg):
    """Output, input grads and every parameter grad equal torch's (float64), and the lean path ran."""
    taken = _spy_fast(monkeypatch)
    ref, ours = mha_pair(batch_first=batch_first, **CONFIGS[cfg])
    set_mode(True, ref, ours)
    B, L = 3, 5
    S = 7 if cross else L
    causal = mask_kind == "causal_hint"
    if causal:
        attn, kpm = torch.ones(L, L, dtype=torch.bool).triu(1), None
    else:
        attn, kpm = make_masks(mask_kind, B, L, S)
    q_in = seq(L, B, E, batch_first, seed=1)
    kv_in = seq(S, B, E, batch_first, seed=2) if cross else None
    g = torch.Generator().manual_seed(9)
    grads, outs = [], []
    for m in (ref, ours):
        q = q_in.clone().requires_grad_()
        kv = kv_in.clone().requires_grad_() if cross else q
        out, w = m(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=False, is_causal=causal)
        assert w is None
        g.manual_seed(9)
        loss = (out * torch.randn(out.shape, generator=g, dtype=DT)).sum()
        xs = [q, kv] if cross else [q]
        grads.append(torch.autograd.grad(loss, xs + [p for _, p in m.named_parameters()]))
        outs.append(out)
    assert_close(outs[1], outs[0])
    for a, b in zip(*grads):
        assert_close(b, a)
    assert taken == [True]


@pytest.mark.parametrize("case", ["need_weights", "unbatched", "bias_kv", "zero_attn", "kdim_vdim", "k_not_v"])
def test_mha_fast_path_falls_back_to_the_general_path(monkeypatch, case):
    """Configurations the lean path does not take still match torch (the general path runs them)."""
    taken = _spy_fast(monkeypatch)
    cfg = {"bias_kv": "bias_kv", "zero_attn": "zero_attn", "kdim_vdim": "kdim_vdim"}.get(case, "default")
    kw = CONFIGS[cfg]
    ref, ours = mha_pair(batch_first=True, **kw)
    B, L, S = 2, 4, 5
    batched = case != "unbatched"
    q = seq(L, B, E, True, batched=batched, seed=1)
    k = seq(S, B, kw.get("kdim", E), True, batched=batched, seed=2)
    v = k if case != "k_not_v" and "vdim" not in kw else seq(S, B, kw.get("vdim", E), True, batched=batched, seed=3)
    attn, kpm = make_masks("both_bool", B, L, S, batched=batched)
    nw = case == "need_weights"
    a, b = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=nw), \
        ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=nw)
    assert_close(b[0], a[0])
    if nw:
        assert_close(b[1], a[1])
    assert taken == []


def _run_with_grads(m, q, kv, attn, kpm, need_weights, seed=123):
    """(out, weights, grads of the inputs and every parameter) of one training call, dropout seed fixed."""
    q = q.clone().requires_grad_()
    kv = q if kv is None else kv.clone().requires_grad_()
    torch.manual_seed(seed)
    out, w = m(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights,
               average_attn_weights=False)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum()
    xs = [q] if kv is q else [q, kv]
    return out, w, torch.autograd.grad(loss, xs + list(m.parameters()))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "both_bool", "attn_float_kpm_bool", "attn3d_float"])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_mha_native_path_equals_the_reference_backend(need_weights, cross, mask_kind, dropout):
    """The module's direct call of the cpu kernel (its C++ autograd) gives the outputs, weights and every
    gradient of the same module on the reference backend (plain math, the same dropout hash, so the same
    kept entries), masks and dropout included; without dropout also those of torch's module."""
    torch.manual_seed(0)
    m = randomize(fnn.MultiheadAttention(E, H, dropout=dropout, batch_first=True, dtype=DT)).train()
    B, L = 3, 5
    S = 6 if cross else L
    attn, kpm = make_masks(mask_kind, B, L, S)
    q = seq(L, B, E, True, seed=1)
    kv = seq(S, B, E, True, seed=2) if cross else None
    native = _run_with_grads(m, q, kv, attn, kpm, need_weights)
    m.backend = "reference"
    oracle = _run_with_grads(m, q, kv, attn, kpm, need_weights)
    assert_close(native[0], oracle[0])
    if need_weights:
        assert_close(native[1], oracle[1])
    for a, b in zip(native[2], oracle[2]):
        assert_close(a, b)
    if dropout == 0.0:  # and equal to torch's module (no common dropout stream to compare with otherwise)
        ref = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=DT)
        ref.load_state_dict(m.state_dict())
        theirs = _run_with_grads(ref, q, kv, attn, kpm, need_weights)
        assert_close(native[0], theirs[0])
        for a, b in zip(native[2], theirs[2]):
            assert_close(a, b)


def test_mha_lean_native_path_refuses_double_backward():
    """create_graph=True through the kernel raises (its backward is not differentiable), as the op's
    registered autograd does, instead of handing back silently wrong higher-order gradients; a plain
    backward afterwards still works."""
    _, ours = mha_pair(batch_first=True)
    x = seq(4, 2, E, True).requires_grad_()
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(ours(x, x, x, need_weights=False)[0].square().sum(), x, create_graph=True)
    g, = torch.autograd.grad(ours(x, x, x, need_weights=False)[0].square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_mha_bool_mask_converted_once_per_object_and_version(monkeypatch):
    """A bool mask handed back is not converted again; modified in place, or at another dtype, it is."""
    conversions = []
    real_zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        conversions.append(args)
        return real_zeros(*args, **kwargs)

    ref, ours = mha_pair(batch_first=True)
    B, L = 2, 5
    x = seq(L, B, E, True, seed=1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    monkeypatch.setattr(fattn_module.torch, "zeros", counting_zeros)
    for _ in range(3):
        assert_close(ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                     ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0])
    assert len(conversions) == 1
    kpm[1, -1] = True  # in place: the version counter moves, the cached bias is stale
    assert_close(ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                 ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0])
    assert len(conversions) == 2
    ours.float()
    ours(x.float(), x.float(), x.float(), key_padding_mask=kpm, need_weights=False)
    assert len(conversions) == 3
    other = kpm.clone()  # an equal mask, but another object
    ours.double()(x, x, x, key_padding_mask=other, need_weights=False)
    assert len(conversions) == 4


def test_mha_backend_choice_cached_per_configuration(monkeypatch):
    """fastattn.backend.select runs once per configuration; a new default backend or dtype selects again."""
    import fastattn.backend as backend_mod
    selected = []
    real = backend_mod.select

    def spy(op, backend, *args, **kwargs):
        name = real(op, backend, *args, **kwargs)
        if op == "attention":  # (the projections' fastattn.linear selects for itself)
            selected.append(name)
        return name

    monkeypatch.setattr(backend_mod, "select", spy)
    monkeypatch.setattr(fattn_module, "_SELECTED", {})
    m = fnn.MultiheadAttention(E, H, batch_first=True, dtype=DT)
    x = seq(4, 2, E, True)
    for _ in range(3):
        m(x, x, x, need_weights=False)
    assert len(selected) == 1
    default = backend_mod.get_backend()
    try:
        backend_mod.set_backend("reference")
        m(x, x, x, need_weights=False)  # the module selects, then fastattn.attention(backend="reference") checks
        assert selected[1:] == ["reference", "reference"]
    finally:
        backend_mod.set_backend(default)
    m.float()(x.float(), x.float(), x.float(), need_weights=False)
    m(x.float(), x.float(), x.float(), need_weights=False)
    assert selected[3:] == ["cpu"]
    with pytest.raises(NotImplementedError, match="backend='cuda' cannot run"):  # errors are never cached away
        fnn.MultiheadAttention(E, H, batch_first=True, dtype=DT, backend="cuda")(x, x, x, need_weights=False)


def test_mha_float_mask_requiring_grad_gets_its_gradient():
    """A float mask that requires grad selects a backend that differentiates it (reference), kept apart in
    the backend cache from the same configuration without one; values and grads equal torch's."""
    ref, ours = mha_pair(batch_first=True)
    B, L = 2, 4
    x = seq(L, B, E, True, seed=1)
    plain = torch.randn(L, L, dtype=DT)
    for m in (ours, ref, ours):  # ours before and after a mask that requires grad: the cache keeps both
        m(x, x, x, attn_mask=plain, need_weights=False)
    grads = []
    for m in (ref, ours):
        mask = plain.clone().requires_grad_()
        out = m(x, x, x, attn_mask=mask, need_weights=False)[0]
        grads.append((out, torch.autograd.grad(out.square().sum(), mask)[0]))
    assert_close(grads[1][0], grads[0][0])
    assert_close(grads[1][1], grads[0][1])


def test_transformer_relu_in_place_keeps_custom_first_linear_intact():
    """The feed-forward ReLU runs in place only on linear1's fresh output, never on the block's input."""
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, dtype=DT, batch_first=True)
    ours = fnn.TransformerEncoderLayer.from_torch(ref)
    ours.linear1 = ref.linear1 = torch.nn.Identity()
    ours.linear2 = ref.linear2 = torch.nn.Linear(E, E, dtype=DT)
    x = seq(4, 2, E, True)
    x_before = x.clone()
    assert_close(ours(x), ref(x))
    assert_close(x, x_before)


# --------------------------------------------------------------------------------------------
# MultiheadAttention: dropout, need_weights, routing through our kernels.
# --------------------------------------------------------------------------------------------
def _heads_by_hand(m, q, k, v, weights):
    """out_proj(weights @ v_heads) from the module's own parameters (seq-first, default config)."""
    Wq, Wk, Wv = m.in_proj_weight.chunk(3)
    bq, bk, bv = m.in_proj_bias.chunk(3)
    L, B, _ = q.shape
    vh = F.linear(v, Wv, bv).reshape(v.shape[0], B, H, E // H).permute(1, 2, 0, 3)  # (B, H, S, D)
    o = (weights @ vh).permute(2, 0, 1, 3).reshape(L, B, E)
    return m.out_proj(o)


def test_mha_dropout_uses_one_mask_for_output_and_weights():
    torch.manual_seed(0)
    m = randomize(fnn.MultiheadAttention(E, H, dropout=0.5, dtype=DT)).train()
    B, L, S = 3, 8, 16
    q = seq(L, B, E, False, seed=1)
    kv = seq(S, B, E, False, seed=2).requires_grad_()
    torch.manual_seed(42)
    out, w = m(q, kv, kv, average_attn_weights=False)
    # the weights carry the dropout mask the kernel used for the output
    dropped = (w == 0).double().mean().item()
    assert 0.4 < dropped < 0.6
    by_hand = _heads_by_hand(m, q, kv, kv, w)
    assert_close(out, by_hand)
    # ... in backward too
    g1, = torch.autograd.grad(out.sum(), kv, retain_graph=True)
    g2, = torch.autograd.grad(by_hand.sum(), kv)
    assert_close(g1, g2)
    # same seed -> same mask; another draw -> another mask
    torch.manual_seed(42)
    assert torch.equal(m(q, kv, kv)[0], out)
    assert not torch.allclose(m(q, kv, kv)[0], out)
    # need_weights=False runs the same kernel call with the same mask
    torch.manual_seed(42)
    assert_close(m(q, kv, kv, need_weights=False)[0], out)


def test_mha_dropout_only_in_training():
    ref, ours = mha_pair(dropout=0.5)
    x = seq(6, 2, E, False)
    set_mode(False, ref, ours)
    assert_close(ours(x, x, x)[0], ref(x, x, x)[0])
    ours.train()
    assert not torch.allclose(ours(x, x, x)[0], ref(x, x, x)[0])


def test_mha_never_calls_torch_attention(monkeypatch):
    """Our modules must not reach torch's SDPA or F.multi_head_attention_forward."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch's attention was called")

    calls = []
    real = fattn_module.attention

    def spy(*args, **kwargs):  # the module hands the reference backend to fastattn.attention
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(F, "multi_head_attention_forward", forbidden)
    monkeypatch.setattr(torch, "_native_multi_head_attention", forbidden)
    monkeypatch.setattr(fattn_module, "attention", spy)
    m = fnn.MultiheadAttention(E, H, batch_first=True, dtype=DT, backend="reference").eval()
    x = seq(5, 2, E, True)
    with torch.no_grad():  # the conditions of torch's own fast path
        for nw in (True, False):
            m(x, x, x, need_weights=nw)
    model = fnn.Transformer(E, H, 1, 1, dim_feedforward=16, dtype=DT, batch_first=True, backend="reference").eval()
    with torch.no_grad():
        model(x, x, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert calls == ["reference"] * (2 + 3)  # MHA twice; encoder self, decoder self and cross once each


def test_mha_backend_argument():
    m = fnn.MultiheadAttention(E, H, dtype=DT, backend="reference")
    assert m.backend == "reference" and "backend='reference'" in repr(m)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        fnn.MultiheadAttention(E, H, backend="nope")
    x = seq(4, 2, E, False)
    with pytest.raises(NotImplementedError, match="backend='cuda' cannot run"):
        fnn.MultiheadAttention(E, H, dtype=DT, backend="cuda")(x, x, x)


def test_mha_average_attn_weights_shapes():
    _, ours = mha_pair(batch_first=True)
    B, L, S = 2, 3, 5
    q, kv = seq(L, B, E, True), seq(S, B, E, True, seed=1)
    assert ours(q, kv, kv)[1].shape == (B, L, S)
    per_head = ours(q, kv, kv, average_attn_weights=False)[1]
    assert per_head.shape == (B, H, L, S)
    assert_close(per_head.mean(1), ours(q, kv, kv)[1])
    assert_close(per_head.sum(-1), torch.ones(B, H, L, dtype=DT))
    assert ours(q[0], kv[0], kv[0], average_attn_weights=False)[1].shape == (H, L, S)


# --------------------------------------------------------------------------------------------
# MultiheadAttention: bad inputs raise clear errors (and the exception types torch raises).
# --------------------------------------------------------------------------------------------
def test_mha_constructor_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        fnn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError):  # torch's exception type, for code written against torch
        fnn.MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="greater than 0"):
        fnn.MultiheadAttention(0, 1)
    with pytest.raises(ValueError, match="dropout must be in"):
        fnn.MultiheadAttention(E, H, dropout=1.5)


B_, L_, S_ = 2, 4, 5
BAD_INPUTS = {
    # name: (kwargs for forward, torch's exception type, our message)
    "attn_mask_2d_shape": (dict(attn_mask=torch.zeros(L_, L_, dtype=torch.bool)), RuntimeError,
                           r"2D attn_mask is \(4, 4\), but should be \(4, 5\)"),
    "attn_mask_3d_shape": (dict(attn_mask=torch.zeros(B_, L_, S_, dtype=torch.bool)), RuntimeError,
                           r"3D attn_mask is \(2, 4, 5\), but should be \(6, 4, 5\)"),
    "attn_mask_4d": (dict(attn_mask=torch.zeros(1, 1, L_, S_, dtype=torch.bool)), AssertionError,
                     "expected `attn_mask` to be `None`, 2-D or 3-D"),
    "attn_mask_int": (dict(attn_mask=torch.zeros(L_, S_, dtype=torch.int32)), AssertionError,
                      "only bool and floating types of attn_mask"),
    "kpm_rank": (dict(key_padding_mask=torch.zeros(B_, 1, S_, dtype=torch.bool)), AssertionError,
                 "expected `key_padding_mask` to be `None` or 2-D"),
    "kpm_shape": (dict(key_padding_mask=torch.zeros(B_, S_ + 1, dtype=torch.bool)), AssertionError,
                  r"key_padding_mask must have shape \(batch, S\) = \(2, 5\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_mha_bad_masks(case):
    kwargs, torch_exc, msg = BAD_INPUTS[case]
    ref, ours = mha_pair()
    q, kv = seq(L_, B_, E, False), seq(S_, B_, E, False, seed=1)
    with pytest.raises(torch_exc):
        ref(q, kv, kv, **kwargs)
    with pytest.raises(torch_exc):
        ours(q, kv, kv, **kwargs)
    with pytest.raises(ValueError, match=msg):
        ours(q, kv, kv, **kwargs)


def test_mha_bad_inputs():
    _, ours = mha_pair()
    q, kv = seq(L_, B_, E, False), seq(S_, B_, E, False, seed=1)
    with pytest.raises(ValueError, match="query should be unbatched 2D or batched 3D"):
        ours(q[None], kv[None], kv[None])
    with pytest.raises(ValueError, match="expected `key` and `value` to be 3-D"):
        ours(q, kv[:, 0], kv[:, 0])
    with pytest.raises(ValueError, match="embedding dimension of 12 in query, but got 11"):
        ours(q[..., :-1], kv, kv)
    with pytest.raises(ValueError, match="kdim=12 and vdim=12"):
        ours(q, kv[..., :-1], kv)
    with pytest.raises(ValueError, match="same batch size"):
        ours(q, kv[:, :1], kv[:, :1])
    with pytest.raises(ValueError, match="do not match value's"):
        ours(q, kv, kv[:-1])
    with pytest.raises(ValueError, match=r"expected `attn_mask` to be `None`, 2-D or 3-D"):
        ours(q[:, 0], kv[:, 0], kv[:, 0], attn_mask=torch.zeros(1, 1, L_, S_))
    bad_3d = torch.zeros(H + 1, L_, S_, dtype=torch.bool)
    with pytest.raises(AssertionError):  # torch's type for this one
        torch.nn.MultiheadAttention(E, H, dtype=DT)(q[:, 0], kv[:, 0], kv[:, 0], attn_mask=bad_3d)
    with pytest.raises(AssertionError, match=r"Expected `attn_mask` shape to be \(3, 4, 5\)"):
        ours(q[:, 0], kv[:, 0], kv[:, 0], attn_mask=bad_3d)
    with pytest.raises(TypeError, match="query must be a Tensor"):
        ours(None, kv, kv)


def test_mha_from_torch_shares_parameters():
    ref = randomize(torch.nn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True, dtype=DT)).eval()
    ours = fnn.MultiheadAttention.from_torch(ref, backend="reference")
    assert not ours.training and ours.backend == "reference"
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1 is p2
    x = seq(5, 2, E, True)
    assert_close(ours(x, x, x)[0], ref(x, x, x)[0])
    with pytest.raises(TypeError, match="expected a torch.nn.MultiheadAttention"):
        fnn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Transformer layers.
# --------------------------------------------------------------------------------------------
D_MODEL, FF = 12, 20

def build(lib, kind, seed=0, nhead=H, **kw):
    """The same Transformer piece from torch.nn or fastattn.nn, created under the same seed."""
    torch.manual_seed(seed)
    kw = dict(dim_feedforward=FF, dtype=DT, **kw)
    if kind == "encoder_layer":
        return lib.TransformerEncoderLayer(D_MODEL, nhead, **kw)
    if kind == "decoder_layer":
        return lib.TransformerDecoderLayer(D_MODEL, nhead, **kw)
    if kind == "encoder":
        return lib.TransformerEncoder(lib.TransformerEncoderLayer(D_MODEL, nhead, **kw), 2,
                                      torch.nn.LayerNorm(D_MODEL, dtype=DT))
    if kind == "decoder":
        return lib.TransformerDecoder(lib.TransformerDecoderLayer(D_MODEL, nhead, **kw), 2,
                                      torch.nn.LayerNorm(D_MODEL, dtype=DT))
    return lib.Transformer(D_MODEL, nhead, 1, 2, **kw)


KINDS = ["encoder_layer", "decoder_layer", "encoder", "decoder", "transformer"]


@pytest.mark.parametrize("kind", KINDS)
def test_transformer_state_dict_keys_init_and_round_trip(kind):
    ref, ours = build(torch.nn, kind, norm_first=True), build(fnn, kind, norm_first=True)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_ours[k]), k  # same seed -> same initial weights
    randomize(ref, seed=2)
    ours.load_state_dict(ref.state_dict())
    randomize(ours, seed=3)
    ref.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k


def run_piece(m, kind, src, tgt, masks):
    if kind == "encoder_layer":
        return m(src, src_mask=masks["src_mask"], src_key_padding_mask=masks["src_kpm"],
                 is_causal=masks["src_is_causal"] or False)
    if kind == "encoder":
        return m(src, mask=masks["src_mask"], src_key_padding_mask=masks["src_kpm"], is_causal=masks["src_is_causal"])
    dec = dict(tgt_mask=masks["tgt_mask"], memory_mask=masks["memory_mask"], tgt_key_padding_mask=masks["tgt_kpm"],
               memory_key_padding_mask=masks["memory_kpm"])
    if kind == "decoder_layer":
        return m(tgt, src, tgt_is_causal=masks["tgt_is_causal"] or False, **dec)
    if kind == "decoder":
        return m(tgt, src, tgt_is_causal=masks["tgt_is_causal"], **dec)
    return m(src, tgt, src_mask=masks["src_mask"], src_key_padding_mask=masks["src_kpm"],
             src_is_causal=masks["src_is_causal"], tgt_is_causal=masks["tgt_is_causal"], **dec)


def transformer_masks(kind, B, S, T, batched):
    none = dict(src_mask=None, src_kpm=None, src_is_causal=None, tgt_mask=None, memory_mask=None, tgt_kpm=None,
                memory_kpm=None, tgt_is_causal=None)
    if kind == "none":
        return none
    if kind == "causal":  # torch's float causal mask; the stacks detect it, the layers get the hint
        return dict(none, src_mask=fnn.Transformer.generate_square_subsequent_mask(S, dtype=DT), src_is_causal=True,
                    tgt_mask=fnn.Transformer.generate_square_subsequent_mask(T, dtype=DT), tgt_is_causal=True)
    if kind == "causal_detected":
        return dict(none, src_mask=torch.nn.Transformer.generate_square_subsequent_mask(S, dtype=DT),
                    tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=DT))
    # "padding": bool masks everywhere, with padding
    src_attn, src_kpm = make_masks("both_bool", B, S, S, batched, seed=1)
    tgt_attn, tgt_kpm = make_masks("both_bool", B, T, T, batched, seed=2)
    mem_attn, _ = make_masks("attn_bool", B, T, S, batched, seed=3)
    return dict(none, src_mask=src_attn, src_kpm=src_kpm, tgt_mask=tgt_attn, tgt_kpm=tgt_kpm,
                memory_mask=mem_attn, memory_kpm=src_kpm)


LAYER_OPTIONS = {
    "post_norm": {},
    "pre_norm_gelu": {"norm_first": True, "activation": "gelu"},
    "callable_act_no_bias": {"activation": torch.tanh, "bias": False, "layer_norm_eps": 1e-3},
}


# (options, mask kind, layout, training): every pair of options x mask kind once, the layout rotating
# so that each options set and each mask kind meets every layout, training mode alternating.
LAYOUTS = ["seq_first", "batch_first", "unbatched"]
TRANSFORMER_CASES = [(opts, mask_kind, LAYOUTS[(i + j) % 3], (i + j) % 2 == 1)
                     for i, opts in enumerate(LAYER_OPTIONS)
                     for j, mask_kind in enumerate(["none", "causal", "causal_detected", "padding"])]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts,mask_kind,layout,training", TRANSFORMER_CASES)
def test_transformer_outputs_match_torch(kind, opts, mask_kind, layout, training):
    batch_first, batched = layout == "batch_first", layout != "unbatched"
    kw = dict(LAYER_OPTIONS[opts], batch_first=batch_first, dropout=0.0)
    ref, ours = build(torch.nn, kind, **kw), build(fnn, kind, **kw)
    randomize(ref, seed=4)
    ours.load_state_dict(ref.state_dict())
    set_mode(training, ref, ours)
    B, S, T = 2, 6, 5
    src, tgt = seq(S, B, D_MODEL, batch_first, batched, seed=5), seq(T, B, D_MODEL, batch_first, batched, seed=6)
    masks = transformer_masks(mask_kind, B, S, T, batched)
    assert_close(run_piece(ours, kind, src, tgt, masks), run_piece(ref, kind, src, tgt, masks))


@pytest.mark.parametrize("kind", ["encoder_layer", "encoder", "transformer"])
def test_transformer_inference_matches_torch_fast_path(kind):
    """Under no_grad in eval (even heads, batch_first) torch takes its fused / NestedTensor path;
    non-padded positions agree (torch's encoder gives norm(0) at padded ones, ours the ordinary output)."""
    ref, ours = build(torch.nn, kind, nhead=2, batch_first=True), build(fnn, kind, nhead=2, batch_first=True)
    randomize(ref, seed=4)
    ours.load_state_dict(ref.state_dict())
    set_mode(False, ref, ours)
    B, S, T = 3, 6, 4
    src, tgt = seq(S, B, D_MODEL, True, seed=5), seq(T, B, D_MODEL, True, seed=6)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 1:] = True
    with torch.no_grad():
        if kind != "transformer":
            a, b = ours(src, src_key_padding_mask=kpm), ref(src, src_key_padding_mask=kpm)
            assert_close(a[~kpm], b[~kpm])
            if kind == "encoder":  # torch really took its NestedTensor path
                assert_close(b[kpm], ref.norm.bias.expand(int(kpm.sum()), D_MODEL))
        else:
            a = ours(src, tgt, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
            b = ref(src, tgt, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
            assert_close(a, b)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_gradients_match_torch(norm_first):
    kw = dict(batch_first=True, dropout=0.0, norm_first=norm_first)
    ref, ours = build(torch.nn, "transformer", **kw), build(fnn, "transformer", **kw)
    randomize(ref, seed=7)
    ours.load_state_dict(ref.state_dict())
    B, S, T = 2, 5, 4
    src, tgt = seq(S, B, D_MODEL, True, seed=1), seq(T, B, D_MODEL, True, seed=2)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=DT)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 3:] = True
    grads = []
    for m in (ref, ours):
        xs = [src.clone().requires_grad_(), tgt.clone().requires_grad_()]
        out = m(*xs, tgt_mask=tgt_mask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum()
        grads.append(torch.autograd.grad(loss, xs + list(m.parameters())))
    for a, b in zip(*grads):
        assert_close(b, a)


def test_transformer_from_torch_shares_parameters():
    ref = randomize(torch.nn.Transformer(D_MODEL, H, 2, 1, FF, dropout=0.0, dtype=DT, batch_first=True), seed=3)
    ref.eval()
    ours = fnn.Transformer.from_torch(ref, backend="reference")
    assert not ours.training
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert all(isinstance(m, fnn.MultiheadAttention) for n, m in ours.named_modules() if n.endswith("attn"))
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in ours.modules())
    src, tgt = seq(5, 2, D_MODEL, True, seed=1), seq(4, 2, D_MODEL, True, seed=2)
    assert_close(ours(src, tgt), ref(src, tgt))
    with pytest.raises(TypeError, match="expected a torch.nn.Transformer"):
        fnn.Transformer.from_torch(ref.encoder)


def test_transformer_errors_like_torch():
    ours = build(fnn, "transformer", batch_first=True)
    src, tgt = seq(5, 2, D_MODEL, True), seq(4, 3, D_MODEL, True)
    with pytest.raises(RuntimeError, match="the batch number of src and tgt must be equal"):
        ours(src, tgt)
    with pytest.raises(RuntimeError, match="feature number of src and tgt must be equal to d_model"):
        ours(src, src[..., :-1])
    with pytest.raises(RuntimeError, match="activation should be relu/gelu, not swish"):
        fnn.TransformerEncoderLayer(D_MODEL, H, activation="swish")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        fnn.TransformerDecoderLayer(10, 3)
    layer = fnn.TransformerEncoderLayer(D_MODEL, H, dtype=DT)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        layer(seq(4, 2, D_MODEL, False), is_causal=True)


def test_generate_square_subsequent_mask():
    m = fnn.Transformer.generate_square_subsequent_mask(4, dtype=DT)
    assert torch.equal(m, torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=DT))
    assert isinstance(fnn.Transformer.__dict__["generate_square_subsequent_mask"], staticmethod)


# --------------------------------------------------------------------------------------------
# GPU: half precision on CUDA against torch's module in float32 (flash-attn's tolerance rule).
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_cuda_half_precision(dtype, need_weights):
    """Ours in fp16/bf16 must be at most 2x (plus a little) as far from an fp32 torch reference as
    torch's own module computing in the same low precision."""
    emb, heads, B, L, S = 128, 2, 2, 129, 77  # head size 64, odd lengths
    torch.manual_seed(0)
    ref32 = torch.nn.MultiheadAttention(emb, heads, batch_first=True, device="cuda").eval()
    ref_lp = torch.nn.MultiheadAttention(emb, heads, batch_first=True, device="cuda", dtype=dtype).eval()
    ours = fnn.MultiheadAttention(emb, heads, batch_first=True, device="cuda", dtype=dtype).eval()
    ref_lp.load_state_dict(ref32.state_dict())
    ours.load_state_dict(ref32.state_dict())
    q = torch.randn(B, L, emb, device="cuda")
    kv = torch.randn(B, S, emb, device="cuda")
    kpm = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    kpm[0, 50:] = True
    want, w_want = ref32(q, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    lp, w_lp = ref_lp(q.to(dtype), kv.to(dtype), kv.to(dtype), key_padding_mask=kpm, need_weights=need_weights)
    got, w_got = ours(q.to(dtype), kv.to(dtype), kv.to(dtype), key_padding_mask=kpm, need_weights=need_weights)
    assert got.dtype == dtype and got.device.type == "cuda"
    err_lp = (lp.float() - want).abs().max().item()
    assert (got.float() - want).abs().max().item() <= 2 * err_lp + 1e-3
    if need_weights:
        assert (w_got.float() - w_want).abs().max().item() <= 2 * (w_lp.float() - w_want).abs().max().item() + 1e-3
