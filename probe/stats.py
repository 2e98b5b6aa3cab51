"""Per-filter statistic kernels: tensors in, tensors out, all on the tensor's device.

Every function takes a layer output viewed as ``[N, C, *positions]`` (the filter axis second) and
returns float32 partial sums of shape ``[C]``. Partial sums from several calls of one layer in a
step add up, and `finalize_metrics` turns them into the metrics of ``probe.schema.METRICS``.
Inputs of lower precision (fp16, bf16) are promoted to float32 before squaring or summing, so
large finite values never overflow to inf.
"""

import torch

from probe.schema import METRICS

# Columns of the per-layer accumulator, each a partial sum over calls and samples.
SUMS = (
    "gain_sum",  # sum over samples of the normaliser gain
    "gain_count",  # samples that contributed to gain_sum
    "out_sum",  # sum of the normalised output before the activation
    "out_sumsq",  # sum of its squares
    "out_count",  # values that contributed to out_sum
    "inactive_count",  # exact zeros after a ReLU-family activation, else values <= 0 before it
    "sparsity_count",  # values that inactive_count looked at
    "active_samples",  # samples whose post-activation map has a non-zero value
    "signal_sum",  # sum over samples of s[n], the gradient norm reaching the filter
    "signal_sumsq",  # sum over samples of s[n] squared
)
SUM_INDEX = {name: i for i, name in enumerate(SUMS)}
METRIC_INDEX = {name: i for i, name in enumerate(METRICS)}


def as_float32(tensor):
    """Return `tensor` in float32, copying only when its dtype is narrower (fp16, bf16)."""
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor
    return tensor.float()


def reduce_dims(tensor):
    """Return the dims of a ``[N, C, *positions]`` tensor that are not the filter axis."""
    return (0,) + tuple(range(2, tensor.dim()))


def position_count(tensor):
    """Return the number of positions per sample and filter of a ``[N, C, *positions]`` tensor."""
    count = 1
    for size in tensor.shape[2:]:
        count *= size
    return count


def channels_second(tensor, channel_dim):
    """View `tensor` with its filter axis at dim 1 (a view, never a copy)."""
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    if channel_dim in (1, 1 - tensor.dim()):
        return tensor
    return tensor.movedim(channel_dim, 1)


def output_sums(output):
    """Return (sum, sum of squares, value count) per filter of the normalised output.

    Args:
        output: ``[N, C, *positions]``, the output of the normaliser (or of the layer when it
            has none), before the activation.
    """
    values = as_float32(output)
    dims = reduce_dims(values)
    total = values.sum(dim=dims, dtype=torch.float32)
    norm = torch.linalg.vector_norm(values, ord=2, dim=dims, dtype=torch.float32)
    count = values.numel() // max(values.shape[1], 1)
    return total, norm.square(), count


def nonzero_per_sample(activated):
    """Return the count of non-zero values per sample and filter, ``[N, C]``."""
    if activated.dim() == 2:
        return (activated != 0).to(torch.int64)
    return torch.count_nonzero(activated, dim=tuple(range(2, activated.dim())))


def relu_family_sums(activated):
    """Return (zero count, value count, active samples) per filter of a ReLU-family output.

    Args:
        activated: ``[N, C, *positions]``, the activation's output.
    """
    nonzero = nonzero_per_sample(activated)
    values_per_sample = position_count(activated)
    zeros = activated.shape[0] * values_per_sample - nonzero.sum(dim=0)
    active = (nonzero > 0).sum(dim=0)
    return zeros, activated.shape[0] * values_per_sample, active


def nonpositive_count(pre_activation):
    """Return the count per filter of values <= 0 in a ``[N, C, *positions]`` tensor."""
    return (pre_activation <= 0).sum(dim=reduce_dims(pre_activation))


def active_sample_count(activated):
    """Return per filter the number of samples whose map has at least one non-zero value."""
    return (nonzero_per_sample(activated) > 0).sum(dim=0)


def gradient_signal_sums(grad_output):
    """Return (sum of s[n], sum of s[n]^2) per filter, s[n] the L2 norm over positions.

    Args:
        grad_output: ``[N, C, *positions]``, dLoss/d(raw layer output).
    """
    dims = tuple(range(2, grad_output.dim()))
    if dims:
        signal = torch.linalg.vector_norm(grad_output, ord=2, dim=dims, dtype=torch.float32)
    else:
        signal = as_float32(grad_output).abs()
    return signal.sum(dim=0), signal.square().sum(dim=0)


def batch_norm_gain(norm, batch_input):
    """Return (gain [C], batch variance [C] or None) of a batch norm for this call.

    The gain is ``weight / sqrt(var + eps)`` with the batch variance in training mode (or when
    the module keeps no running statistics) and the running variance in eval mode.
    """
    use_batch_stats = norm.training or norm.running_var is None
    if use_batch_stats:
        values = as_float32(batch_input)
        variance, _ = torch.var_mean(values, dim=reduce_dims(values), correction=0)
    else:
        variance = norm.running_var.float()
    gain = torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        gain = gain * norm.weight.detach().float()
    return gain, (variance if use_batch_stats else None)


def filter_norms(weight):
    """Return the L2 norm of each output filter's slice of a weight ``[C_out, ...]``."""
    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1), dim=1,
                                    dtype=torch.float32)


def safe_ratio(numerator, denominator):
    """Divide, returning 0 where both are 0 (no signal) and keeping NaN/Inf otherwise."""
    ratio = numerator / denominator
    both_zero = (numerator == 0) & (denominator == 0)
    return torch.where(both_zero, torch.zeros_like(ratio), ratio)


def finalize_metrics(sums, grad_norm, weight_norm, update_norm):
    """Turn a layer's partial sums ``[C, len(SUMS)]`` into metrics ``[C, len(METRICS)]``."""
    column = {name: sums[:, i] for name, i in SUM_INDEX.items()}
    out_count = column["out_count"]

    # A layer without a normaliser reports gain 1 by definition: gain_count stays 0 then.
    gain = torch.where(column["gain_count"] > 0,
                       column["gain_sum"] / column["gain_count"].clamp(min=1),
                       torch.ones_like(column["gain_sum"]))
    out_mean = column["out_sum"] / out_count
    out_rms = torch.sqrt(column["out_sumsq"] / out_count)
    sparsity = column["inactive_count"] / column["sparsity_count"]
    effective_batch = safe_ratio(column["signal_sum"].square(), column["signal_sumsq"])
    update_ratio = safe_ratio(update_norm, weight_norm)

    by_name = {
        "gain": gain,
        "out_rms": out_rms,
        "out_mean": out_mean,
        "sparsity": sparsity,
        "active_samples": column["active_samples"],
        "effective_batch": effective_batch,
        "grad_norm": grad_norm,
        "weight_norm": weight_norm,
        "update_ratio": update_ratio,
    }
    return torch.stack([by_name[name] for name in METRICS], dim=1)
