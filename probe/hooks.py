"""Forward, gradient and parameter hooks that fill one accumulator per layer and step.

`LayerHooks` owns every hook handle it registers and removes them all in `remove()`. It writes
no attribute onto user modules. Tensors flowing from a layer to its normaliser and activation
are matched by identity through weak references, so nothing here keeps an activation alive.
"""

import logging
import weakref
from functools import partial

import numpy as np
import torch

from probe import stats
from probe.discovery import (ACTIVATION_TYPES, PASS_THROUGH_TYPES, RELU_FAMILY_TYPES,
                             fused_activation, is_agc, is_normaliser)

logger = logging.getLogger(__name__)

OUT_SUMS = ("out_sum", "out_sumsq", "out_count")
SPARSITY_SUMS = ("inactive_count", "sparsity_count", "active_samples")
COL = stats.SUM_INDEX
# Sums that are the same for every filter of a layer: kept as Python numbers during the step.
COUNT_SUMS = ("gain_count", "out_count", "sparsity_count")


class LayerSums:
    """One layer's partial sums in a step: row views of the shared table, plus the count sums
    (equal for all filters) as Python numbers, written into the table when the step ends."""

    __slots__ = ("rows", "counts")

    def __init__(self, table_view):
        self.rows = table_view.unbind(0)
        self.counts = dict.fromkeys(COUNT_SUMS, 0.0)

    def add(self, name, value):
        self.rows[COL[name]].add_(value)

    def count(self, name, amount):
        self.counts[name] += amount

    def reset(self, names):
        for name in names:
            if name in self.counts:
                self.counts[name] = 0.0
            else:
                self.rows[COL[name]].zero_()



def current_graph_task_id():
    """Return the id of the backward pass running on this thread, or -1 outside backward."""
    getter = getattr(torch._C, "_current_graph_task_id", None)
    return getter() if getter is not None else -1


class StepState:
    """Partial sums and references the hooks collected in the current step."""

    def __init__(self, layers):
        # All layers' partial sums in one float32 table [len(stats.SUMS), total filters], so a
        # step is reset and finished with a few whole-table operations. Allocated on first use,
        # on the device of the first recorded activation.
        self.table = None
        self.offsets = {}
        start = 0
        for spec in layers:
            self.offsets[spec.index] = (start, start + spec.filters)
            start += spec.filters
        self.total_filters = start
        self.accumulators = {}  # layer index -> LayerSums over its slice of `table`
        self.recorded_outside_backward = set()  # layer indices seen in a normal forward
        self.recorded = set()  # layer indices whose forward was recorded in this step
        self.flow = {}  # id(tensor) -> (weak reference, LayerSpec, stage)
        self.grads = {}  # layer index -> weight gradient tensor held until the step ends
        self.snapshots_taken = set()  # layer indices whose weights were copied this step
        self.batch_size = None

    def clear(self):
        if self.table is not None:
            self.table.zero_()
        for sums in self.accumulators.values():
            sums.counts = dict.fromkeys(COUNT_SUMS, 0.0)
        self.recorded_outside_backward.clear()
        self.recorded.clear()
        self.flow.clear()
        self.grads.clear()
        self.snapshots_taken.clear()
        self.batch_size = None


# NOTE: recording every step costs 5 to 9 % of a CPU ResNet step (benchmarks/bench_probe.py),
# above the 5 % aim. More than half of it is the Python work of these hooks, not the passes.
class LayerHooks:
    """Registers the probe's hooks on a model and turns each call into partial sums.

    Args:
        layers: LayerSpec list from `probe.discovery.find_layers`.
        model: the user's module (unwrapped), whose `training` flag gates recording.
        on_error: called with the exception when a hook fails; hooks never raise unless it does.
        record_eval: also record forward passes under `torch.no_grad()` or in eval mode.
        compile_kernels: fuse the statistic kernels with torch.compile (see `stats.Kernels`).
    """

    def __init__(self, model, layers, on_error, record_eval=False, compile_kernels=False):
        self.model = model
        self.kernels = stats.kernels(compile_kernels)
        self.layers = layers
        self.on_error = on_error
        self.record_eval = record_eval
        self.state = StepState(layers)
        self.recording = False
        self.enabled = True
        self.step_token = 0
        self.next_depth = 0
        self.snapshots = {}  # layer index -> weight copy before the optimiser step
        self.row_cache = {}
        self.layers_by_index = sorted(layers, key=lambda spec: spec.index)
        self.handles = []

        by_module = {id(spec.module): spec for spec in layers}
        for spec in layers:
            self.handles.append(spec.module.register_forward_hook(
                partial(self.guarded, self.on_layer_forward, spec)))
            weight = spec.module.weight
            if weight.requires_grad:
                self.handles.append(weight.register_post_accumulate_grad_hook(
                    partial(self.guarded, self.on_weight_grad, spec)))

        for module in model.modules():
            if id(module) in by_module:
                continue
            if is_normaliser(module) or isinstance(module, ACTIVATION_TYPES + PASS_THROUGH_TYPES):
                self.handles.append(module.register_forward_hook(
                    partial(self.guarded, self.on_follower_forward)))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.state.clear()
        self.snapshots.clear()
        self.enabled = False

    def guarded(self, handler, *args):
        """Run a hook body; report any exception instead of raising into the training loop."""
        if not self.enabled:
            return None
        try:
            handler(*args)
        except Exception as error:  # noqa: BLE001 - the training loop must never see it
            self.on_error(error)
        return None

    # Forward side ---------------------------------------------------------------------------

    def should_record_forward(self, spec):
        if not self.recording:
            return False
        if not self.record_eval and not (torch.is_grad_enabled() and self.model.training):
            return False

        # Gradient checkpointing runs a layer's forward again inside backward. Count that
        # recomputation only when the normal forward was not recorded (reentrant checkpointing
        # runs the first forward under no_grad).
        if current_graph_task_id() != -1:
            if spec.index in self.state.recorded_outside_backward:
                return False
        else:
            self.state.recorded_outside_backward.add(spec.index)
        self.state.recorded.add(spec.index)
        return True

    def accumulator(self, spec, like):
        state = self.state
        if state.table is None:
            state.table = torch.zeros(len(stats.SUMS), state.total_filters, dtype=torch.float32,
                                      device=like.device)
            for index, (start, stop) in state.offsets.items():
                state.accumulators[index] = LayerSums(state.table[:, start:stop])
        return state.accumulators[spec.index]

    def remember(self, tensor, spec, stage):
        self.state.flow[id(tensor)] = (weakref.ref(tensor), spec, stage)

    def source_of(self, inputs):
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return None
        entry = self.state.flow.get(id(inputs[0]))
        if entry is None or entry[0]() is not inputs[0]:
            return None
        return entry

    def on_layer_forward(self, spec, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        if spec.depth is None:
            spec.depth = self.next_depth
            self.next_depth += 1
        if self.state.batch_size is None and output.dim() > 0:
            self.state.batch_size = output.shape[0]
        if not self.should_record_forward(spec):
            return

        values = stats.channels_second(output.detach(), spec.channel_dim)
        accumulator = self.accumulator(spec, values)
        # Until a normaliser is seen, or when there is none, the raw output is what the
        # activation gets. The normaliser's hook resets these sums when it shows up.
        if spec.normaliser is None:
            add_output_sums(self.kernels, accumulator, values)
            if spec.activation is None:
                add_pre_activation_sums(self.kernels, accumulator, values)
        self.remember(output, spec, "raw")

        if output.requires_grad:
            output.register_hook(partial(self.guarded, self.on_output_grad, spec,
                                         self.step_token))

    def on_follower_forward(self, module, inputs, output):
        source = self.source_of(inputs)
        if source is None or not isinstance(output, torch.Tensor):
            return
        _, spec, stage = source
        if is_normaliser(module) and stage == "raw":
            self.on_normaliser(spec, module, inputs[0], output)
        elif isinstance(module, ACTIVATION_TYPES) and stage in ("raw", "normalised"):
            self.on_activation(spec, module, inputs[0], output)
        elif isinstance(module, PASS_THROUGH_TYPES):
            self.remember(output, spec, stage)

    def on_normaliser(self, spec, module, raw, output):
        accumulator = self.state.accumulators[spec.index]
        if spec.normaliser is None:
            spec.normaliser, spec.normaliser_name = module, self.module_name(module)
            accumulator.reset(OUT_SUMS + SPARSITY_SUMS)
            if fused_activation(module):
                spec.activation, spec.activation_name = module, spec.normaliser_name
        if spec.normaliser is not module:
            return

        raw_values = stats.channels_second(raw.detach(), spec.channel_dim)
        out_values = stats.channels_second(output.detach(), spec.channel_dim)
        samples = raw_values.shape[0]
        if is_agc(module):
            add_agc_sums(self.kernels, accumulator, module, out_values, samples)
        else:
            add_batch_norm_sums(self.kernels, accumulator, module, raw_values, output,
                                out_values, samples)

        if fused_activation(module):
            add_pre_activation_sums(self.kernels, accumulator, out_values)
            return
        if spec.activation is None:
            add_pre_activation_sums(self.kernels, accumulator, out_values)
        self.remember(output, spec, "normalised")

    def on_activation(self, spec, module, pre, output):
        accumulator = self.state.accumulators[spec.index]
        if spec.activation is None:
            spec.activation, spec.activation_name = module, self.module_name(module)
            accumulator.reset(SPARSITY_SUMS)
        if spec.activation is not module:
            return

        post_values = stats.channels_second(output.detach(), spec.channel_dim)
        if isinstance(module, RELU_FAMILY_TYPES):
            add_relu_family_sums(self.kernels, accumulator, post_values)
            return

        # An in-place activation has overwritten its input. The activations that can run in
        # place (leaky ReLU, ELU, SELU, CELU, hardtanh, ...) keep the sign of their input, so
        # "pre-activation <= 0" is read from the output then.
        pre_values = post_values if pre is output else stats.channels_second(
            pre.detach(), spec.channel_dim)
        add_pre_activation_sums(self.kernels, accumulator, pre_values, post_values)

    def module_name(self, module):
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        return None

    # Backward side --------------------------------------------------------------------------

    def on_output_grad(self, spec, token, grad):
        if token != self.step_token or spec.index not in self.state.recorded:
            return
        values = stats.channels_second(grad, spec.channel_dim)
        signal_sum, signal_sumsq = self.kernels.gradient_signal_sums(values)
        accumulator = self.state.accumulators[spec.index]
        accumulator.add("signal_sum", signal_sum)
        accumulator.add("signal_sumsq", signal_sumsq)

    def on_weight_grad(self, spec, weight):
        if not self.recording:
            return
        self.state.grads[spec.index] = weight.grad
        if spec.index in self.state.snapshots_taken:
            return
        snapshot = self.snapshots.get(spec.index)
        if snapshot is None or snapshot.shape != weight.shape:
            snapshot = torch.empty_like(weight, memory_format=torch.preserve_format)
            self.snapshots[spec.index] = snapshot
        snapshot.copy_(weight.detach())
        self.state.snapshots_taken.add(spec.index)

    # End of step ----------------------------------------------------------------------------

    def finish_step(self):
        """Return (metrics [rows, len(METRICS)] on the device, layer mask) for this step.

        Rows are the filters of the layers whose forward was recorded (mask True), in the order
        of `self.layers`.
        """
        state = self.state
        mask = [spec.index in state.recorded for spec in self.layers]
        if state.table is None or not any(mask):
            return None, mask

        self.write_counts()
        norms = torch.cat([self.weight_norms(spec) for spec in self.layers_by_index], dim=1)
        metrics = stats.finalize_metrics(state.table, *norms.to(state.table.device))
        rows = self.row_order(tuple(mask), metrics.device)
        return metrics.index_select(0, rows), mask

    def write_counts(self):
        """Copy each layer's count sums into its columns of the table, one copy per sum."""
        state = self.state
        filters = [spec.filters for spec in self.layers_by_index]
        for name in COUNT_SUMS:
            per_layer = [state.accumulators[spec.index].counts[name]
                         for spec in self.layers_by_index]
            values = torch.from_numpy(np.repeat(np.asarray(per_layer, np.float32), filters))
            state.table[COL[name]].copy_(values)

    def weight_norms(self, spec):
        """Return [3, C]: grad norm, weight norm and update norm of each filter of `spec`."""
        weight = spec.module.weight.detach()
        grad = self.state.grads.get(spec.index)
        if grad is None:
            grad = torch.zeros_like(weight)
        # Without a snapshot from this step's backward the weights did not change here.
        has_snapshot = spec.index in self.state.snapshots_taken
        before = self.snapshots[spec.index] if has_snapshot else weight
        return torch.stack(stats.weight_norms(weight, grad, before))

    def row_order(self, mask, device):
        """Return the table rows of the present layers, in `self.layers` order (cached)."""
        key = (mask, str(device))
        rows = self.row_cache.get(key)
        if rows is None:
            indices = []
            for spec, present in zip(self.layers, mask):
                if present:
                    start, stop = self.state.offsets[spec.index]
                    indices.extend(range(start, stop))
            rows = torch.tensor(indices, dtype=torch.long, device=device)
            self.row_cache[key] = rows
        return rows

    def start_step(self, recording):
        """Reset the collected values and set whether the next step is recorded."""
        self.state.clear()
        self.step_token += 1
        self.recording = recording


def channel_count(values):
    """Return the values per filter of a ``[N, C, *positions]`` tensor."""
    return values.numel() / max(values.shape[1], 1)


def add_output_sums(kernels, accumulator, values):
    total, sumsq = kernels.output_sums(values)
    accumulator.add("out_sum", total)
    accumulator.add("out_sumsq", sumsq)
    accumulator.count("out_count", channel_count(values))


def add_pre_activation_sums(kernels, accumulator, pre_values, post_values=None):
    """Add sparsity sums for an activation that is not ReLU-like (or none): values <= 0 count
    as inactive, and a sample is active where the post-activation map has a non-zero value."""
    if post_values is None or post_values is pre_values:
        inactive, active = kernels.nonpositive_sums(pre_values)
    else:
        inactive = kernels.nonpositive_count(pre_values)
        active = kernels.zero_sums(post_values)[1]
    accumulator.add("inactive_count", inactive)
    accumulator.count("sparsity_count", channel_count(pre_values))
    accumulator.add("active_samples", active)


def add_relu_family_sums(kernels, accumulator, values):
    zeros, active = kernels.zero_sums(values)
    accumulator.add("inactive_count", zeros)
    accumulator.count("sparsity_count", channel_count(values))
    accumulator.add("active_samples", active)


def add_batch_norm_sums(kernels, accumulator, norm, raw_values, output, out_values, samples):
    gain, batch_variance = stats.batch_norm_gain(kernels, norm, raw_values, output)
    accumulator.add("gain_sum", gain * samples)
    accumulator.count("gain_count", samples)

    if batch_variance is None:
        add_output_sums(kernels, accumulator, out_values)
        return

    # With batch statistics the normalised output has mean `bias` and mean square
    # gain^2 * var + bias^2 exactly, which saves a pass over the output.
    bias = norm.bias.detach().float() if norm.bias is not None else torch.zeros_like(gain)
    count = channel_count(out_values)
    accumulator.add("out_sum", bias * count)
    accumulator.add("out_sumsq", (gain.square() * batch_variance + bias.square()) * count)
    accumulator.count("out_count", count)


def add_agc_sums(kernels, accumulator, norm, out_values, samples):
    gain = getattr(norm, "last_gain", None)
    if gain is not None:
        accumulator.add("gain_sum", gain.float() * samples)
        accumulator.count("gain_count", samples)
    if fused_activation(norm):
        # Leaky ReLU is invertible: the pre-activation is the output divided by the slope
        # where it is negative.
        pre_values = torch.where(out_values >= 0, out_values, out_values / norm.negative_slope)
        add_output_sums(kernels, accumulator, pre_values)
    else:
        add_output_sums(kernels, accumulator, out_values)
