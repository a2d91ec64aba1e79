"""Models: loss falls in a few steps (both impls), impl=fastattn == impl=torch for the same weights, KV cache, data."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
import fastattn.nn
from fastattn.data import digits, seq2seq
from fastattn.data.text import CharVocab, char_lm
from fastattn.models import ConvNet, LSTMClassifier, Seq2SeqTransformer, TransformerLM, modules
from fastattn.models._impl import cached_attention_fastattn, cached_attention_torch, fastattn_missing


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread is fastest, and avoids OpenMP spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


warnings.filterwarnings("ignore", message="fastattn.attention: falling back")
warnings.filterwarnings("ignore", message="enable_nested_tensor is True")

NEEDS = {
    "cnn": ("Conv2d",), "rnn": ("LSTM",), "seq2seq": ("Transformer",), "lm": ("MultiheadAttention",),
}



def make(kind, impl, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "cnn":
        m = ConvNet(num_classes=4, image_size=16, channels=(8,), hidden=16, impl=impl)
        x = torch.randn(8, 3, 16, 16)
        y = torch.arange(8) % 4
        return m.to(dtype), (x.to(dtype),), lambda out: F.cross_entropy(out, y)
    if kind == "rnn":
        m = LSTMClassifier(input_size=8, num_classes=4, hidden_size=12, num_layers=2, bidirectional=True, impl=impl)
        x = torch.randn(8, 6, 8)
        y = torch.arange(8) % 4
        return m.to(dtype), (x.to(dtype),), lambda out: F.cross_entropy(out, y)
    if kind == "seq2seq":
        m = Seq2SeqTransformer(vocab_size=14, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                               dim_feedforward=32, max_len=16, impl=impl)
        src = torch.randint(3, 13, (4, 6))
        src[0, 4:] = 0  # padding
        tgt = torch.cat([torch.ones(4, 1, dtype=torch.long), src.flip(1)], 1)
        return m.to(dtype), (src, tgt[:, :-1]), lambda out: F.cross_entropy(out.reshape(-1, 14), tgt[:, 1:].reshape(-1))
    m = TransformerLM(vocab_size=11, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, block_size=24, impl=impl)
    x = torch.randint(0, 11, (3, 20))
    y = (x + 1) % 11
    return m.to(dtype), (x,), lambda out: F.cross_entropy(out.reshape(-1, 11), y.reshape(-1))


KINDS = ("cnn", "rnn", "seq2seq", "lm")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["torch", "fastattn"])
def test_loss_falls(kind, impl):
    if impl == "fastattn":
        missing = fastattn_missing(*NEEDS[kind], "Adam")
        if missing:
            pytest.skip(f"{missing} not in this build yet")
    model, inputs, loss_fn = make(kind, impl)
    opt = modules(impl).Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(12):
        loss = loss_fn(model(*inputs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_fastattn_equals_torch_same_weights(kind):
    missing = fastattn_missing(*NEEDS[kind])
    if missing:
        pytest.skip(f"{missing} not in this build yet")
    ref, inputs, loss_fn = make(kind, "torch", torch.float64)
    ours, _, _ = make(kind, "fastattn", torch.float64)
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():  # scramble ours first: load_state_dict must really carry the weights over
        for p in ours.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict())
    out_ref, out = ref(*inputs), ours(*inputs)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-9)
    loss_fn(out_ref).backward()
    loss_fn(out).backward()
    g_ref = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n].grad, atol=1e-9, rtol=1e-7, msg=n)


def test_impl_errors():
    with pytest.raises(ValueError, match="impl must be one of"):
        ConvNet(impl="numpy")
    missing = fastattn_missing("Conv2d")
    if missing:
        with pytest.raises(RuntimeError, match="fastattn.nn.Conv2d.*impl='torch'"):
            ConvNet(impl="fastattn")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(image_size=4, channels=(8, 8), impl="torch")


def test_convnet_seed_shape():
    m = ConvNet(impl="torch")
    assert m.fc1.in_features == 32 * 31 * 31 and m.fc1.out_features == 64 and m.fc2.out_features == 10
    assert tuple(m.convs[0].weight.shape) == (32, 3, 3, 3)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def _lm(dtype=torch.float64):
    torch.manual_seed(1)
    return TransformerLM(vocab_size=13, d_model=16, nhead=4, num_layers=2, dim_feedforward=32, block_size=40,
                         impl="torch").to(dtype).eval()


@pytest.mark.parametrize("chunks", [(1,) * 12, (16, 1, 3), (5, 7, 16)])
def test_lm_kv_cache_matches_full_forward(chunks):
    lm = _lm()
    x = torch.randint(0, 13, (2, sum(chunks)))
    full = lm(x)
    cache, outs, s = lm.new_cache(2), [], 0
    for c in chunks:
        outs.append(lm.forward_cached(x[:, s:s + c], cache))
        s += c
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 9), (4, 9), (16, 16), (16, 30)])
def test_cached_attention_fastattn_equals_torch(L, S):
    g = torch.Generator().manual_seed(L * 100 + S)
    q = torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(cached_attention_fastattn(q, k, v), cached_attention_torch(q, k, v),
                               atol=1e-12, rtol=1e-12)


def test_lm_decode_through_fastattn_attention():
    lm = _lm()
    lm._attend_fn = cached_attention_fastattn  # what impl=fastattn uses, on the torch-built model
    x = torch.randint(0, 13, (2, 21))
    cache = lm.new_cache(2)
    out = torch.cat([lm.forward_cached(x[:, :16], cache), lm.forward_cached(x[:, 16:], cache)], 1)
    torch.testing.assert_close(out, lm(x), atol=1e-10, rtol=1e-10)


def test_generate():
    lm = _lm(torch.float32)
    x = torch.randint(0, 13, (2, 5))
    a = lm.generate(x, 60, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = lm.generate(x, 60, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 65) and torch.equal(a, b) and torch.equal(a[:, :5], x)  # past block_size: cache rebuilt
    greedy = lm.generate(x, 6, temperature=0)
    top1 = lm.generate(x, 6, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy, top1)
    ctx = x.clone()  # greedy by hand with the full forward
    for _ in range(6):
        ctx = torch.cat([ctx, lm(ctx)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ctx)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(x, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        lm.generate(x, 2, top_k=0)
    with pytest.raises(ValueError, match="block_size"):
        lm(torch.zeros(1, 41, dtype=torch.long))


def test_seq2seq_greedy_shapes():
    model, (src, _), _ = make("seq2seq", "torch")
    out = model.eval().greedy(src, 8, bos_id=1, eos_id=2)
    assert out.shape[0] == 4 and out.shape[1] <= 8


# ---------------------------------------------------------------------------- data
def test_digits_splits():
    a, b = digits("image", seed=3), digits("sequence", seed=3)
    assert [len(a[k]) for k in ("train", "val", "test")] == [1257, 270, 270]
    x, y = a["train"][0]
    assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1
    xs, ys = b["train"][0]
    assert xs.shape == (8, 8) and ys == y
    torch.testing.assert_close(x[0, ::8, ::8], xs)  # upscaled ×8 by repetition, same image
    c = digits("image", seed=4)
    assert not torch.equal(a["test"].labels, c["test"].labels)
    with pytest.raises(ValueError, match="kind"):
        digits("video")


def test_seq2seq_tasks():
    from fastattn.data.seq2seq import detokenize
    for task, f in [("copy", lambda s: s), ("reverse", lambda s: s[::-1]), ("sort", lambda s: "".join(sorted(s))),
                    ("addition", lambda s: str(eval(s)))]:
        ds = seq2seq(task, seed=1, n_train=50, n_val=5, n_test=5)
        for i in range(10):
            src, tgt = ds["train"][i]
            assert tgt[0] == 1 and detokenize(tgt[1:]) == f(detokenize(src[src != 0]))
    assert torch.equal(seq2seq("reverse", 2, 20, 2, 2)["train"].src, seq2seq("reverse", 2, 20, 2, 2)["train"].src)
    with pytest.raises(ValueError, match="task must be"):
        seq2seq("divide")


def test_char_corpus_and_text_file(tmp_path):
    lm = char_lm(block_size=32, seed=0)
    x, y = lm["train"][0]
    assert x.shape == (32,) and torch.equal(x[1:], y[:-1])
    assert 2.5 < lm["unigram"] < 4.0
    v = lm["vocab"]
    assert v.decode(v.encode("def f(x):")) == "def f(x):"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharVocab(list("ab")).encode("abc")
    p = tmp_path / "t.txt"
    p.write_text("hello world, " * 200)
    small = char_lm(block_size=16, text=fastattn.data.load_text_file(str(p)))
    assert len(small["vocab"]) == len(set("hello world, "))
    with pytest.raises(FileNotFoundError):
        fastattn.data.load_text_file(str(tmp_path / "missing.txt"))


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        os.makedirs(tmp_path / c)
        for i in range(10):
            Image.new("RGB", (20 + i, 12), color).save(tmp_path / c / f"{i}.png")
    splits = fastattn.data.image_folder(str(tmp_path), seed=0, size=16)
    assert sum(len(s) for s in splits.values()) == 20 and splits["train"].num_classes == 2
    x, y = splits["train"][0]
    assert x.shape == (3, 16, 16)
    assert (x[0].mean() > 0.9) == (y == 0) and (x[2].mean() > 0.9) == (y == 1)
    with pytest.raises(ValueError, match="class subfolders"):
        fastattn.data.image_folder(str(tmp_path / "cat"))
