"""Compare AutoGainControl with batch norm: training step time and bytes kept for backward.

Step time: the ResNet of ``probe.models`` (width 32, so 32 to 128 filters) on random
[N, 3, 32, 32] images. Each timing covers one SGD step (forward, backward, update). AGC and
batch norm alternate in one process after warm-up steps, and the table shows medians.

Memory: a stack of ``conv 3x3 -> normaliser -> activation`` blocks, counting the bytes of the
tensors autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``), each storage
once. The in-place AGC fuses normaliser and leaky ReLU and keeps only its output, which the next
convolution keeps anyway.

    PYTHONPATH=. python benchmarks/bench_agc.py
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from probe.agc import AutoGainControl, AutoGainControlLeakyReLU
from probe.models import build_model

# Targets for AGC / batch norm; batch 8 step time is reported without one.
STEP_TARGET = 1.0
PLAIN_MEMORY_TARGET = 1.0
IN_PLACE_MEMORY_TARGET = 0.6


def make_step(norm, batch_size, width, compile_model=False, seed=0):
    """Return a function that runs one training step of the ResNet with ``norm``."""
    torch.manual_seed(seed)
    model = build_model("resnet", norm, in_channels=3, width=width)
    if compile_model:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(batch_size, width, repeats, warmup, compile_model=False):
    """Return {norm: median seconds per step}, alternating the order of the two every repeat."""
    steps = {norm: make_step(norm, batch_size, width, compile_model) for norm in ("batchnorm", "agc")}
    for step in steps.values():
        for _ in range(warmup):
            step()

    times = {norm: [] for norm in steps}
    order = list(steps)
    for _ in range(repeats):
        for norm in order:
            start = time.perf_counter()
            steps[norm]()
            times[norm].append(time.perf_counter() - start)
        order.reverse()
    return {norm: statistics.median(values) for norm, values in times.items()}


def make_stack(kind, channels, depth):
    """``depth`` blocks of conv 3x3 (no bias) -> normaliser -> activation."""
    layers = []
    for _ in range(depth):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if kind == "batchnorm":
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        elif kind == "agc":
            layers += [AutoGainControl(channels), nn.ReLU()]
        else:
            layers.append(AutoGainControlLeakyReLU(channels))
    return nn.Sequential(*layers)


def saved_bytes(kind, batch_size, channels, side, depth):
    """Bytes of the storages autograd keeps for one backward of the stack, each counted once."""
    torch.manual_seed(0)
    stack = make_stack(kind, channels, depth)
    x = torch.randn(batch_size, channels, side, side)
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = stack(x)
    output.sum().backward()
    return sum(storages.values())


def print_table(rows):
    print("| measure | batch norm | AGC | AGC / batch norm | target | met |")
    print("|---|---|---|---|---|---|")
    for name, baseline, value, unit, target in rows:
        ratio = value / baseline
        target_text = "none" if target is None else f"<= {target}x"
        if target is None:
            met = "-"
        else:
            met = "yes" if ratio <= target else "no"
        print(f"| {name} | {baseline:.4g} {unit} | {value:.4g} {unit} | {ratio:.3f}x | {target_text} | {met} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--width", type=int, default=32, help="ResNet width (filters of the first stage)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per normaliser and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--compile", action="store_true",
                        help="wrap both ResNets in torch.compile (warm-up steps include compiling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for batch_size, target in ((64, STEP_TARGET), (8, None)):
        medians = time_steps(batch_size, args.width, args.repeats, args.warmup, args.compile)
        rows.append((f"ResNet step, batch {batch_size}", 1e3 * medians["batchnorm"],
                     1e3 * medians["agc"], "ms", target))

    shape = dict(batch_size=16, channels=32, side=32, depth=4)
    batch_norm_bytes = saved_bytes("batchnorm", **shape)
    mib = 2.0 ** 20
    rows.append(("saved for backward, plain AGC", batch_norm_bytes / mib,
                 saved_bytes("agc", **shape) / mib, "MiB", PLAIN_MEMORY_TARGET))
    rows.append(("saved for backward, in-place AGC + leaky ReLU", batch_norm_bytes / mib,
                 saved_bytes("agc_in_place", **shape) / mib, "MiB", IN_PLACE_MEMORY_TARGET))

    mode = "torch.compile" if args.compile else "eager"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet width {args.width} "
          f"({mode}), {args.repeats} repeats; memory stack: {shape}")
    print_table(rows)


if __name__ == "__main__":
    main()
