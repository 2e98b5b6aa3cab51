"""Probe overhead on a training step: the same loop with and without the probe, A/B alternated.

Run:  python benchmarks/bench_probe.py            (about 3 minutes on 2 CPU cores)
      python benchmarks/bench_probe.py --quick    (a smoke run)

Each round times a block of steps without the probe, with the probe recording every step, and
with the probe recording every 10th step, in rotating order, on one model and optimiser. A
block's cost is its mean step time, so the recorded steps of "every 10th step" count at their
share. The table shows, per configuration, the median over rounds of that mean and its ratio
to the same figure without the probe, measured in the same run. The last column gives the
median time of recorded steps alone.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import probe
from probe.models import build_model

TARGETS = {"probe, every step": 1.05, "probe, every 10th step": 1.01}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per step")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per block (a multiple of 10)")
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 steps")
    return parser.parse_args()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_block(model, optimizer, batches, device, probe_every, run_root):
    """Return the per-step seconds of one block; the probe is attached only inside the block.

    `batches` must hold at least 10 batches."""
    p = None
    if probe_every is not None:
        p = probe.Probe(model, run_dir=run_root / "bench", every=probe_every, if_exists="new")
    # The first 10 steps are not timed: they contain the probe's one-time layer discovery, so
    # the timed steps hold recorded steps in the steady proportion (1 in `probe_every`).
    seconds = []
    for index, (x, y) in enumerate(batches[-10:] + batches):
        synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if p is not None:
            p.step(loss=loss, lr=0.05)
        synchronize(device)
        if index >= 10:
            seconds.append(time.perf_counter() - start)
    if p is not None:
        p.close()
    return seconds


def main():
    args = parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 10
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model("resnet", "batchnorm", in_channels=3, num_classes=10).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(torch.randn(args.batch, 3, 32, 32, device=args.device),
                torch.randint(0, 10, (args.batch,), device=args.device))
               for _ in range(args.steps)]
    configs = {"no probe": None, "probe, every step": 1, "probe, every 10th step": 10}

    # Warm-up: allocator, kernels, first-step discovery.
    with tempfile.TemporaryDirectory() as tmp:
        time_block(model, optimizer, batches[:3], args.device, None, Path(tmp))
        time_block(model, optimizer, batches[:3], args.device, 1, Path(tmp))

    block_means = {name: [] for name in configs}
    recorded_steps = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        names = list(configs)
        for round_index in range(args.rounds):
            order = names[round_index % 3:] + names[:round_index % 3]
            for name in order:
                seconds = time_block(model, optimizer, batches, args.device, configs[name],
                                     Path(tmp))
                block_means[name].append(statistics.fmean(seconds))
                every = configs[name] or 1
                recorded_steps[name].extend(seconds[::every])

    layers = sum(1 for m in model.modules() if isinstance(m, probe.probe.nn.Conv2d))
    print(f"ResNet-style CNN ({layers} convs), batch {args.batch}, 32x32, device {args.device}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'configuration':<26}{'mean step ms':>14}{'ratio':>9}{'target':>10}"
          f"{'recorded step ms':>18}")
    baseline = statistics.median(block_means["no probe"])
    for name in configs:
        mean = statistics.median(block_means[name])
        target = TARGETS.get(name)
        target_text = f"<= {target:.2f}" if target else ""
        recorded = statistics.median(recorded_steps[name]) * 1e3
        print(f"{name:<26}{mean * 1e3:>14.1f}{mean / baseline:>9.3f}{target_text:>10}"
              f"{recorded:>18.1f}")


if __name__ == "__main__":
    main()
