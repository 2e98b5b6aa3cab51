"""Probe overhead on a training step: the same loop with and without the probe, A/B alternated.

Run:  python benchmarks/bench_probe.py            (about 4 minutes on 2 CPU cores)
      python benchmarks/bench_probe.py --quick    (a smoke run)

Each round times a block of steps without the probe, with the probe recording every step, and
with the probe recording every 10th step, in rotating order, on one model and optimiser. The
table shows the median step time of each configuration over all rounds and its ratio to the
median without the probe measured in the same run.
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
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 steps")
    return parser.parse_args()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_block(model, optimizer, batches, device, probe_every, run_root):
    """Return the per-step seconds of one block; the probe is attached only inside the block."""
    p = None
    if probe_every is not None:
        p = probe.Probe(model, run_dir=run_root / "bench", every=probe_every, if_exists="new")
    seconds = []
    for x, y in batches:
        synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if p is not None:
            p.step(loss=loss, lr=0.05)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    if p is not None:
        p.close()
    return seconds


def main():
    args = parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 4
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

    medians = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        names = list(configs)
        for round_index in range(args.rounds):
            order = names[round_index % 3:] + names[:round_index % 3]
            for name in order:
                seconds = time_block(model, optimizer, batches, args.device, configs[name],
                                     Path(tmp))
                medians[name].append(statistics.median(seconds))

    layers = sum(1 for m in model.modules() if isinstance(m, probe.probe.nn.Conv2d))
    print(f"ResNet-style CNN ({layers} convs), batch {args.batch}, 32x32, device {args.device}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'configuration':<26}{'median step ms':>16}{'ratio':>10}{'target':>10}")
    baseline = statistics.median(medians["no probe"])
    for name in configs:
        median = statistics.median(medians[name])
        target = TARGETS.get(name)
        target_text = f"<= {target:.2f}" if target else ""
        print(f"{name:<26}{median * 1e3:>16.1f}{median / baseline:>10.3f}{target_text:>10}")


if __name__ == "__main__":
    main()
