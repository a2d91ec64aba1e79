"""The training CLI: bad arguments, every model end to end, exact resume, 2-process DDP == 1 process."""
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastattn import train
from fastattn.__main__ import main as cli
from fastattn.models._impl import fastattn_missing


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread is fastest, and avoids OpenMP spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_COLUMNS = ("epoch_time_s", "step_time_ms")


def run(argv):
    assert cli(["train", "--no-progress"] + argv) == 0


def metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(f)]


def weights(out):
    return train.load_checkpoint(out)["model"]


def fails(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err


RNN = ["rnn", "--impl", "torch", "--train-limit", "192", "--batch-size", "32", "--model-kwargs", '{"hidden_size": 16}']


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("argv,match", [
    (["train", "mlp"], "invalid choice: 'mlp'"),
    (["train", "cnn", "--lr", "-1"], "--lr must be > 0"),
    (["train", "cnn", "--epochs", "0"], "--epochs must be > 0"),
    (["train", "cnn", "--batch-size", "0"], "--batch-size must be > 0"),
    (["train", "cnn", "--optim", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["train", "cnn", "--task", "reverse"], "--task is for the seq2seq model"),
    (["train", "rnn", "--data", "x.txt"], "--data takes an image folder"),
    (["train", "cnn", "--data", "/no/such/folder"], "no such folder"),
    (["train", "lm", "--model-kwargs", "{oops"], "--model-kwargs must be a JSON object"),
    (["train", "lm", "--device", "tpu"], "--device"),
    (["train", "cnn", "--resume", "/no/such/run"], "no checkpoint"),
    (["generate", "--ckpt", "/no/such/run"], "no checkpoint"),
])
def test_bad_arguments(argv, match, capsys):
    fails(argv, capsys, match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(capsys):
    fails(["train", "cnn", "--device", "cuda"], capsys, "CUDA is not available")


def test_bad_model_kwargs_and_batch(tmp_path, capsys):
    fails(["train"] + RNN[:3] + ["--model-kwargs", '{"widht": 3}', "--out", str(tmp_path)], capsys,
          "bad model arguments")
    fails(["train", "rnn", "--impl", "torch", "--train-limit", "8", "--batch-size", "16", "--out", str(tmp_path)],
          capsys, "larger than the 8 training samples")


def test_fastattn_impl_missing_is_a_clear_error(tmp_path, capsys):
    missing = fastattn_missing("LSTM", "Adam")
    if not missing:
        pytest.skip("fastattn has LSTM and Adam: nothing missing")
    fails(["train", "rnn", "--impl", "fastattn", "--out", str(tmp_path)], capsys, "--impl torch")


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    fails(["train", "rnn", "--resume", str(tmp_path)], capsys, "corrupt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    fails(["train", "rnn", "--resume", str(tmp_path)], capsys, "not a fastattn-train-1 checkpoint")


# ---------------------------------------------------------------------------- end to end
def test_resume_equals_uninterrupted(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(RNN + ["--epochs", "2", "--out", full])
    run(RNN + ["--epochs", "2", "--max-steps", "4", "--out", part])       # stops mid epoch 1 (6 steps each)
    assert not os.path.exists(os.path.join(part, "metrics.csv"))
    run(["rnn", "--resume", part, "--max-steps", "9"])                    # into epoch 2, stops mid-epoch again
    assert len(metrics(part)) == 1
    run(["rnn", "--resume", part])                                        # to the end
    assert metrics(part) == metrics(full)
    assert len(metrics(full)) == 2
    a, b = weights(full), weights(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fails(["train", "rnn", "--resume", part, "--lr", "0.5"], capsys, "differs from the checkpoint")
    fails(["train", "cnn", "--resume", part], capsys, "checkpoint is of a rnn model")


def test_cnn_and_lm_end_to_end_and_generate(tmp_path, capsys):
    cnn = str(tmp_path / "cnn")
    run(["cnn", "--impl", "torch", "--train-limit", "64", "--batch-size", "16", "--epochs", "1", "--optim", "sgd",
         "--lr", "0.01", "--model-kwargs", '{"channels": [4], "hidden": 8}', "--out", cnn])
    for f in ("metrics.csv", "metrics.png", "checkpoint.pt", "test.json"):
        assert os.path.exists(os.path.join(cnn, f)), f
    lm = str(tmp_path / "lm")
    run(["lm", "--impl", "torch", "--train-limit", "64", "--batch-size", "16", "--epochs", "1",
         "--model-kwargs", '{"d_model": 32, "num_layers": 1, "dim_feedforward": 64, "block_size": 32}', "--out", lm])
    rows = metrics(lm)
    assert float(rows[0]["val_loss"]) < 5.0
    capsys.readouterr()
    assert cli(["generate", "--ckpt", lm, "--prompt", "def ", "--max-new-tokens", "40", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.rstrip("\n")) >= 40
    fails(["generate", "--ckpt", cnn], capsys, "needs an lm or seq2seq checkpoint")
    fails(["generate", "--ckpt", lm, "--prompt", "\u2603"], capsys, "not in the vocabulary")
    fails(["generate", "--ckpt", lm, "--temperature", "-1"], capsys, "--temperature")


def test_seq2seq_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "s2s")
    run(["seq2seq", "--impl", "torch", "--task", "copy", "--train-limit", "256", "--batch-size", "64", "--epochs", "1",
         "--model-kwargs", '{"d_model": 32, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64}',
         "--out", out])
    row = metrics(out)[0]
    assert 0.0 <= float(row["val_exact"]) <= 1.0 and float(row["val_loss"]) < 3.0
    capsys.readouterr()
    assert cli(["generate", "--ckpt", out, "--prompt", "1234", "--max-new-tokens", "6"]) == 0
    assert all(c.isdigit() or c in "+_^?" for c in capsys.readouterr().out.strip())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, loopback) == one process with the same global batch."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = RNN + ["--epochs", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fastattn", "train"]
    r = subprocess.run(cmd + args + ["--out", two], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on 2 process(es)" in r.stdout
    run(args + ["--out", one])
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    m1, m2 = metrics(one)[0], metrics(two)[0]
    for k in ("train_loss", "val_loss", "val_acc"):
        assert abs(float(m1[k]) - float(m2[k])) < 1e-4, (k, m1[k], m2[k])


def test_amp_smoke(tmp_path):
    """--amp: bfloat16 autocast on the CPU (float16 + GradScaler on CUDA) trains and validates."""
    out = str(tmp_path / "amp")
    run(["lm", "--impl", "torch", "--amp", "--train-limit", "64", "--batch-size", "32", "--epochs", "1",
         "--model-kwargs", '{"d_model": 32, "num_layers": 1, "dim_feedforward": 64, "block_size": 32}', "--out", out])
    row = metrics(out)[0]
    assert float(row["train_loss"]) < 6.0 and float(row["val_loss"]) < 6.0


LM_TINY = ["lm", "--train-limit", "64", "--batch-size", "32", "--model-kwargs",
           '{"d_model": 32, "num_layers": 1, "dim_feedforward": 64, "block_size": 32}']


@pytest.mark.skipif(bool(fastattn_missing("MultiheadAttention", "AdamW")),
                    reason=f"{fastattn_missing('MultiheadAttention', 'AdamW')} not in this build yet")
def test_impl_fastattn_cli_and_resume_across_impls(tmp_path, capsys):
    """impl=fastattn trains and generates (KV-cache decode through fastattn.attention); a torch run resumes
    under impl=fastattn from the same checkpoint (same state_dict keys)."""
    import warnings
    warnings.filterwarnings("ignore", message="fastattn.attention: falling back")
    ours, mixed = str(tmp_path / "ours"), str(tmp_path / "mixed")
    run(LM_TINY + ["--impl", "fastattn", "--epochs", "1", "--out", ours])
    capsys.readouterr()
    assert cli(["generate", "--ckpt", ours, "--prompt", "def ", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    run(LM_TINY + ["--impl", "torch", "--epochs", "2", "--max-steps", "2", "--out", mixed])
    run(["lm", "--resume", mixed, "--impl", "fastattn"])
    assert len(metrics(mixed)) == 2
