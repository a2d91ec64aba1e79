"""One training loop for every model: ``fastattn train {cnn,rnn,seq2seq,lm}`` and ``fastattn generate``.

    fastattn train cnn --out runs/cnn                  # seed CNN on digits, defaults reach >= 97 %
    fastattn train lm --epochs 1 --max-steps 50 --out runs/lm
    fastattn train rnn --resume runs/rnn --epochs 40   # continues exactly where runs/rnn stopped
    torchrun --nproc_per_node=2 -m fastattn train rnn --out runs/rnn-ddp
    fastattn generate --ckpt runs/lm --prompt "The " --max-new-tokens 200

What a run writes to ``--out DIR``: ``metrics.csv`` (one row per epoch), ``metrics.png`` (loss and
accuracy), ``checkpoint.pt`` (written atomically: temp file + ``os.replace``) holding the model,
optimizer, AMP scaler, RNG states, the epoch and batch position in the data order and the metric
history, and ``test.json`` after the last epoch.

Exact resume: the data order of epoch ``e`` is a seeded permutation (``DistributedSampler`` with
``seed``, ``set_epoch(e)``) cut into fixed batches, so a checkpoint's (epoch, batch) position plus the
RNG states continue the run as if it had never stopped (``--max-steps`` stops mid-epoch).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA); ``--batch-size`` is the global batch, each
rank taking ``batch_size / world_size`` of the same samples a single process would use in that
step; rank 0 alone logs and writes files.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DistributedSampler
from torch.utils.data._utils.collate import default_collate

MODELS = ("cnn", "rnn", "seq2seq", "lm")
OPTIMS = ("sgd", "adam", "adamw")
CKPT_NAME = "checkpoint.pt"
CKPT_FORMAT = "fastattn-train-1"

# Defaults per model: chosen to reach the README targets on a CPU in a few minutes.
DEFAULTS: Dict[str, dict] = {
    "cnn": dict(optim="adam", lr=1e-3, epochs=8, batch_size=32),
    "rnn": dict(optim="adamw", lr=1e-2, epochs=30, batch_size=32),
    "seq2seq": dict(optim="adamw", lr=2e-3, epochs=3, batch_size=128),
    "lm": dict(optim="adamw", lr=2e-3, epochs=2, batch_size=64),
}
# Arguments a resumed run may change; all the others must match the checkpoint.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "out", "device", "backend", "impl", "amp", "threads", "no_progress",
                     "resume")


class TrainError(ValueError):
    """A bad argument or an unusable checkpoint: the CLI prints it as ``error: ...``."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=MODELS, help="cnn: seed CNN on digits; rnn: seed LSTM on digit rows; "
                   "seq2seq: encoder-decoder Transformer on a synthetic task; lm: character Transformer LM")
    p.add_argument("--optim", choices=OPTIMS, help="optimizer (default per model)")
    p.add_argument("--lr", type=float, help="learning rate (default per model)")
    p.add_argument("--epochs", type=int, help="epochs in total (default per model)")
    p.add_argument("--batch-size", type=int, help="global batch size (default per model)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda", "triton", "reference"),
                   help="fastattn kernel backend (default: fastattn's process default)")
    p.add_argument("--impl", choices=("fastattn", "torch"),
                   help="modules and optimizer from fastattn (default) or from stock torch")
    p.add_argument("--amp", action="store_true", default=None, help="autocast (bfloat16 on CPU, float16 + GradScaler on CUDA)")
    p.add_argument("--seed", type=int, help="seed for data splits, data order and init (default 0)")
    p.add_argument("--out", help="output folder (default runs/<model>, or the --resume folder)")
    p.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint.pt is in DIR")
    p.add_argument("--schedule", choices=("cosine", "constant"),
                   help="learning rate: cosine decay to 0 over all the run's steps (default) or constant")
    p.add_argument("--max-steps", type=int, help="stop (and checkpoint) after this many optimizer steps in total")
    p.add_argument("--data", help="user data: an image folder (class per subfolder) for cnn, a text file for lm")
    p.add_argument("--task", choices=("copy", "reverse", "sort", "addition"), help="seq2seq task (default reverse)")
    p.add_argument("--train-limit", type=int, help="train on the first N training samples only (smoke runs)")
    p.add_argument("--model-kwargs", help='JSON object of model constructor overrides, e.g. \'{"d_model": 64}\'')
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is fastest for "
                   "these small models on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a training output folder (or its checkpoint.pt) of an lm or seq2seq")
    p.add_argument("--prompt", default="\n", help="text to continue (lm) or digits to transform (seq2seq)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--impl", choices=("fastattn", "torch"), help="default: the checkpoint's")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda", "triton", "reference"))


def _check_positive(name: str, value, allow_none=True, strictly=True):
    if value is None:
        if allow_none:
            return
        raise TrainError(f"--{name} is required")
    if (value <= 0 if strictly else value < 0) or (isinstance(value, float) and not math.isfinite(value)):
        raise TrainError(f"--{name} must be {'> 0' if strictly else '>= 0'}, got {value}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"--device {name!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return dev


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults (from the model's table or the checkpoint) and check every value."""
    _check_positive("lr", args.lr)
    _check_positive("epochs", args.epochs)
    _check_positive("batch-size", args.batch_size)
    _check_positive("max-steps", args.max_steps)
    _check_positive("train-limit", args.train_limit)
    _check_positive("threads", getattr(args, "threads", None))
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        try:
            args.model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise TrainError(f"--model-kwargs must be a JSON object: {e}") from None
        if not isinstance(args.model_kwargs, dict):
            raise TrainError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    if args.task is not None and args.model != "seq2seq":
        raise TrainError(f"--task is for the seq2seq model, not {args.model}")
    if args.data is not None:
        if args.model not in ("cnn", "lm"):
            raise TrainError(f"--data takes an image folder (cnn) or a text file (lm), not data for {args.model}")
        if args.model == "cnn" and not os.path.isdir(args.data):
            raise TrainError(f"--data {args.data!r}: no such folder (cnn takes a folder with a subfolder per class)")
        if args.model == "lm" and not os.path.isfile(args.data):
            raise TrainError(f"--data {args.data!r}: no such file (lm takes a text file)")
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume)
        saved = ckpt["config"]
        if saved["model"] != args.model:
            raise TrainError(f"--resume {args.resume}: the checkpoint is of a {saved['model']} model, not {args.model}")
        for k, v in saved.items():
            if k in RESUME_MAY_CHANGE:
                continue
            given = getattr(args, k, None)
            if given is not None and given != v:
                raise TrainError(f"--{k.replace('_', '-')} {given!r} differs from the checkpoint's {v!r}: "
                                 f"a resumed run keeps it (you may change {', '.join(RESUME_MAY_CHANGE[:-1])})")
            setattr(args, k, v)
        for k in ("epochs", "impl", "amp", "backend"):
            if getattr(args, k) is None:
                setattr(args, k, saved[k])
        if args.out is None:
            args.out = args.resume
        args.checkpoint = ckpt
    else:
        args.checkpoint = None
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seed is None:
        args.seed = 0
    if args.impl is None:
        args.impl = "fastattn"
    if args.schedule is None:
        args.schedule = "cosine"
    args.amp = bool(args.amp)
    if args.model == "seq2seq" and args.task is None:
        args.task = "reverse"
    if args.out is None:
        args.out = os.path.join("runs", args.model)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise TrainError(f"--out {args.out!r} exists and is not a folder")
    args.device_obj = resolve_device(args.device)
    return args


def config_of(args) -> dict:
    """The arguments that define a run (saved in the checkpoint)."""
    keys = ("model", "optim", "lr", "epochs", "batch_size", "device", "backend", "impl", "amp", "seed", "out",
            "max_steps", "data", "task", "train_limit", "model_kwargs", "schedule")
    return {k: getattr(args, k) for k in keys}


# --------------------------------------------------------------------------------------------
# Tasks: data, model, loss per batch, evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class Task:
    splits: dict                      # "train" / "val" / "test" datasets
    model_name: str                   # class name in fastattn.models
    model_kwargs: dict                # constructor arguments (without impl/backend)
    batch_loss: Callable              # (model, batch) -> (mean loss, n correct, n counted)
    extra_eval: Optional[Callable] = None   # (model, dataset, device) -> dict of extra metrics
    info: dict = field(default_factory=dict)  # saved with the checkpoint (vocab, unigram baseline)


def _classify_loss(model, batch):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    return loss, int((logits.argmax(-1) == y).sum()), y.numel()


def _seq2seq_loss(model, batch):
    from fastattn.data.seq2seq import PAD
    src, tgt = batch
    logits = model(src, tgt[:, :-1]).float()
    target = tgt[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD)
    keep = target != PAD
    return loss, int(((logits.argmax(-1) == target) & keep).sum()), int(keep.sum())


def _lm_loss(model, batch):
    x, y = batch
    logits = model(x).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss, int((logits.argmax(-1) == y).sum()), y.numel()


def _seq2seq_exact(model, ds, device) -> dict:
    """Greedy decoding of every sample; exact match = the whole target sequence (up to EOS) right."""
    from fastattn.data.seq2seq import BOS, EOS, PAD
    exact = n = 0
    for s in range(0, len(ds), 500):
        src, tgt = ds.src[s:s + 500].to(device), ds.tgt[s:s + 500].to(device)
        target = tgt[:, 1:]
        pred = model.greedy(src, target.shape[1], BOS, EOS)
        pred = F.pad(pred, (0, target.shape[1] - pred.shape[1]), value=PAD)
        exact += int((pred == target).all(dim=1).sum())
        n += len(src)
    return {"exact": exact / max(n, 1)}


def build_task(args) -> Task:
    from fastattn import data
    kw = dict(args.model_kwargs or {})
    if args.model in ("cnn", "rnn"):
        if args.model == "cnn" and args.data:
            splits = data.image_folder(args.data, seed=args.seed)
            classes = splits["train"].num_classes
        else:
            splits = data.digits("image" if args.model == "cnn" else "sequence", seed=args.seed)
            classes = 10
        name = "ConvNet" if args.model == "cnn" else "LSTMClassifier"
        return Task(splits, name, {"num_classes": classes, **kw}, _classify_loss)
    if args.model == "seq2seq":
        splits = data.seq2seq(args.task, seed=args.seed)
        return Task(splits, "Seq2SeqTransformer", {"vocab_size": splits["train"].vocab_size, **kw}, _seq2seq_loss,
                    _seq2seq_exact)
    block = int(kw.get("block_size", 64))
    text = data.load_text_file(args.data) if args.data else None
    lm = data.char_lm(block_size=block, seed=args.seed, text=text)
    splits = {k: lm[k] for k in ("train", "val", "test")}
    return Task(splits, "TransformerLM", {"vocab_size": len(lm["vocab"]), "block_size": block, **kw}, _lm_loss,
                info={"vocab": lm["vocab"].chars, "unigram": lm["unigram"]})


def build_model(model_name: str, model_kwargs: dict, impl: str, backend: Optional[str]) -> nn.Module:
    from fastattn import models
    cls = getattr(models, model_name)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            return cls(**model_kwargs, impl=impl, backend=backend)
    except TypeError as e:
        raise TrainError(f"bad model arguments {model_kwargs} for {model_name}: {e}") from None
    except RuntimeError as e:
        if "impl='fastattn' needs" in str(e):
            raise TrainError(str(e).replace("impl='torch'", "--impl torch")) from None
        raise


def build_optimizer(name: str, params, lr: float, impl: str):
    from fastattn.models._impl import modules
    try:
        cls = getattr(modules(impl), {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[name])
    except RuntimeError as e:
        raise TrainError(str(e).replace("impl='torch'", "--impl torch")) from None
    if name == "sgd":
        return cls(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return cls(params, lr=lr, weight_decay=0.01)
    return cls(params, lr=lr)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    import numpy as np
    st = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out_dir: str, state: dict) -> str:
    """torch.save to a temp file in ``out_dir``, then os.replace: a crash leaves the old checkpoint whole."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CKPT_NAME)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and check a checkpoint (a file, or a folder holding checkpoint.pt); clear errors otherwise."""
    file = os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path
    if not os.path.exists(file):
        where = f"folder {path!r} has no {CKPT_NAME}" if os.path.isdir(path) else f"{path!r} does not exist"
        raise TrainError(f"no checkpoint: {where}")
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (a truncated zip, a pickle error, anything: it is unusable)
        raise TrainError(f"checkpoint {file!r} is corrupt or not a fastattn checkpoint: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [k for k in ("format", "config", "model", "optimizer", "epoch", "batch", "history", "rng", "task")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or ckpt.get("format") != CKPT_FORMAT:
        raise TrainError(f"checkpoint {file!r} is not a {CKPT_FORMAT} checkpoint (missing {missing or ['format']})")
    return ckpt


# --------------------------------------------------------------------------------------------
# Metrics files
# --------------------------------------------------------------------------------------------
METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "val_exact", "lr",
                  "epoch_time_s", "step_time_ms"]


def write_metrics(out_dir: str, history: List[dict], unigram: Optional[float] = None) -> None:
    tmp = os.path.join(out_dir, "metrics.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    os.replace(tmp, os.path.join(out_dir, "metrics.csv"))
    plot_metrics(os.path.join(out_dir, "metrics.png"), history, unigram)


def plot_metrics(path: str, history: List[dict], unigram: Optional[float] = None, title: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a1.plot(ep, [r["val_loss"] for r in history], "o-", label="val")
    if unigram is not None:
        a1.axhline(unigram, ls="--", c="gray", label="unigram baseline")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend()
    a2.plot(ep, [r["train_acc"] for r in history], "o-", label="train acc")
    a2.plot(ep, [r["val_acc"] for r in history], "o-", label="val acc")
    if any(r.get("val_exact") is not None for r in history):
        a2.plot(ep, [r.get("val_exact") for r in history], "o-", label="val exact match")
    a2.set_xlabel("epoch"), a2.set_ylabel("accuracy"), a2.legend()
    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(path))))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------
def dist_setup(device: torch.device):
    """(rank, world, device); initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_sum(values: List[float], world: int, device) -> List[float]:
    if world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _to(batch, device):
    return [b.to(device, non_blocking=True) for b in batch]


@torch.no_grad()
def evaluate(model, task: Task, ds, device, batch_size: int = 256, amp: bool = False) -> dict:
    was = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for s in range(0, len(ds), batch_size):
        batch = _to(default_collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))]), device)
        with _autocast(device, amp):
            loss, c, n = task.batch_loss(model, batch)
        loss_sum += float(loss) * n
        correct += c
        count += n
    out = {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}
    if task.extra_eval is not None:
        with _autocast(device, amp):
            out.update(task.extra_eval(model, ds, device))
    model.train(was)
    return out


def _autocast(device, amp: bool):
    if not amp:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def train(args) -> dict:
    """Run (or continue) training as ``args`` (from the parser + :func:`finish_args`) say; returns the summary."""
    import torch.distributed as dist
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        return _train(args)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(args) -> dict:
    import fastattn
    from torch.nn.parallel import DistributedDataParallel
    rank, world, device = dist_setup(args.device_obj)
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    if args.backend is not None:
        fastattn.set_backend(args.backend)
    log = print if rank == 0 else (lambda *a, **k: None)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    task = build_task(args)
    train_ds = task.splits["train"]
    if args.train_limit:
        train_ds = torch.utils.data.Subset(train_ds, range(min(args.train_limit, len(train_ds))))
    if len(train_ds) < args.batch_size:
        raise TrainError(f"--batch-size {args.batch_size} is larger than the {len(train_ds)} training samples")
    torch.manual_seed(args.seed)
    model = build_model(task.model_name, task.model_kwargs, args.impl, args.backend).to(device)
    optimizer = build_optimizer(args.optim, model.parameters(), args.lr, args.impl)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")

    epoch, batch_pos, global_step, history = 0, 0, 0, []
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, correct, n, steps in this epoch (partial epochs survive a resume)
    ckpt = args.checkpoint
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainError(f"checkpoint in {args.resume!r} does not fit this model/optimizer: {e}") from None
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        epoch, batch_pos, global_step = ckpt["epoch"], ckpt["batch"], ckpt["global_step"]
        history = list(ckpt["history"])
        sums = list(ckpt["sums"]) if rank == 0 else [0.0, 0.0, 0.0, 0.0]
        set_rng_state(ckpt["rng"])
        log(f"resumed {args.resume}: epoch {epoch}, batch {batch_pos}, step {global_step}")
    raw_model = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    per_rank = args.batch_size // world
    total_steps = args.epochs * (len(sampler) // per_rank)

    def lr_at(step: int) -> float:
        if args.schedule == "constant":
            return args.lr
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"{args.model}: {task.model_name} impl={args.impl} ({n_params / 1e6:.2f}M params), {len(train_ds)} train "
        f"samples, batch {args.batch_size} on {world} process(es), {args.optim} lr={args.lr}, device {device}")

    def checkpoint_state(at_epoch: int, at_batch: int, partial) -> dict:
        return {"format": CKPT_FORMAT, "config": config_of(args), "task": {"model_name": task.model_name,
                "model_kwargs": task.model_kwargs, "info": task.info}, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": at_epoch, "batch": at_batch, "global_step": global_step, "sums": partial,
                "history": history, "rng": rng_state()}

    stopped = False
    model.train()
    while epoch < args.epochs and not stopped:
        sampler.set_epoch(epoch)
        batches = list(BatchSampler(sampler, per_rank, drop_last=True))
        t_epoch = time.perf_counter()
        step_time = 0.0
        bar = range(batch_pos, len(batches))
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
        for bi in bar:
            batch = _to(default_collate([train_ds[i] for i in batches[bi]]), device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step)
            t0 = time.perf_counter()
            with _autocast(device, args.amp):
                loss, correct, n = task.batch_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_value = float(loss.detach())
            step_time += time.perf_counter() - t0
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss became {loss_value} at step {global_step}: lower --lr")
            sums = [sums[0] + loss_value * n, sums[1] + correct, sums[2] + n, sums[3] + 1]
            global_step += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if args.max_steps is not None and global_step >= args.max_steps and bi + 1 < len(batches):
                partial = all_sum(sums[:3], world, device) + [sums[3]]
                if rank == 0:
                    save_checkpoint(args.out, checkpoint_state(epoch, bi + 1, partial))
                log(f"stopped after --max-steps {args.max_steps} (epoch {epoch + 1}, batch {bi + 1}); "
                    f"continue with --resume {args.out}")
                stopped = True
                break
        if hasattr(bar, "close"):
            bar.close()
        if stopped:
            break
        loss_sum, correct_sum, count = all_sum(sums[:3], world, device)
        val = evaluate(raw_model, task, task.splits["val"], device, amp=args.amp)
        steps_here = max(sums[3], 1)
        row = {"epoch": epoch + 1, "step": global_step, "train_loss": loss_sum / max(count, 1),
               "train_acc": correct_sum / max(count, 1), "val_loss": val["loss"], "val_acc": val["acc"],
               "val_exact": val.get("exact"), "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": round(time.perf_counter() - t_epoch, 3),
               "step_time_ms": round(1e3 * step_time / steps_here, 3)}
        history.append(row)
        epoch, batch_pos, sums = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
        if rank == 0:
            save_checkpoint(args.out, checkpoint_state(epoch, 0, sums))
            write_metrics(args.out, history, task.info.get("unigram"))
        extra = f" val_exact {row['val_exact']:.4f}" if row["val_exact"] is not None else ""
        log(f"epoch {epoch}/{args.epochs}: train_loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
            f"val_loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{extra} | {row['step_time_ms']:.1f} ms/step")
        if args.max_steps is not None and global_step >= args.max_steps:
            stopped = epoch < args.epochs
            if stopped:
                log(f"stopped after --max-steps {args.max_steps}; continue with --resume {args.out}")
    summary = {"model": args.model, "impl": args.impl, "epochs_done": epoch, "global_step": global_step,
               "history": history, "unigram": task.info.get("unigram"), "out": args.out}
    if not stopped and epoch >= args.epochs:
        test = evaluate(raw_model, task, task.splits["test"], device, amp=args.amp)
        summary["test"] = test
        extra = f", exact match {test['exact']:.4f}" if "exact" in test else ""
        uni = f" (unigram baseline {task.info['unigram']:.4f})" if "unigram" in task.info else ""
        log(f"test: loss {test['loss']:.4f}{uni}, accuracy {test['acc']:.4f}{extra}")
        if rank == 0:
            with open(os.path.join(args.out, "test.json"), "w") as f:
                json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    return summary


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------
def generate(args) -> str:
    _check_positive("max-new-tokens", args.max_new_tokens)
    if args.temperature < 0:
        raise TrainError(f"--temperature must be >= 0, got {args.temperature}")
    _check_positive("top-k", args.top_k)
    ckpt = load_checkpoint(args.ckpt)
    name = ckpt["config"]["model"]
    if name not in ("lm", "seq2seq"):
        raise TrainError(f"generate needs an lm or seq2seq checkpoint; {args.ckpt!r} holds a {name} model")
    device = resolve_device(args.device)
    impl = args.impl or ckpt["config"]["impl"]
    if args.backend is not None:
        import fastattn
        fastattn.set_backend(args.backend)
    model = build_model(ckpt["task"]["model_name"], ckpt["task"]["model_kwargs"], impl, args.backend)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    if name == "seq2seq":
        from fastattn.data.seq2seq import BOS, EOS, detokenize, tokenize
        try:
            src = torch.tensor([tokenize(args.prompt)], device=device)
        except ValueError as e:
            raise TrainError(str(e)) from None
        return detokenize(model.greedy(src, min(args.max_new_tokens, model.max_len - 1), BOS, EOS)[0])
    from fastattn.data.text import CharVocab
    vocab = CharVocab(ckpt["task"]["info"]["vocab"])
    try:
        idx = vocab.encode(args.prompt)[None].to(device)
    except ValueError as e:
        raise TrainError(f"--prompt: {e}") from None
    if idx.shape[1] == 0:
        raise TrainError("--prompt is empty")
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g)
    return vocab.decode(out[0])


def main(argv=None, command: str = "train") -> int:
    """``python -m fastattn.train ...`` (the same as ``fastattn train ...``)."""
    p = argparse.ArgumentParser(prog=f"fastattn {command}")
    (add_train_args if command == "train" else add_generate_args)(p)
    args = p.parse_args(argv)
    return run_command(command, args, p)


def run_command(command: str, args, parser: argparse.ArgumentParser) -> int:
    try:
        if command == "train":
            train(finish_args(args))
        else:
            print(generate(args))
    except TrainError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
