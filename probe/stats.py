"""Per-filter statistic kernels: tensors in, tensors out, all on the tensor's device.

Every function takes a layer output viewed as ``[N, C, *positions]`` (the filter axis second) and
returns float32 partial sums of shape ``[C]``. Partial sums from several calls of one layer in a
step add up, and `finalize_metrics` turns them into the metrics of ``probe.schema.METRICS``.
Inputs of lower precision (fp16, bf16) are promoted to float32 before squaring or summing, so
large finite values never overflow to inf.
"""

import logging
from functools import partial

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

logger = logging.getLogger(__name__)


def reduce_dims(tensor):
    """Return the dims of a ``[N, C, *positions]`` tensor that are not the filter axis."""
    return (0,) + tuple(range(2, tensor.dim()))


def channels_second(tensor, channel_dim):
    """View `tensor` with its filter axis at dim 1 (a view, never a copy)."""
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    if channel_dim in (1, 1 - tensor.dim()):
        return tensor
    return tensor.movedim(channel_dim, 1)


def _output_sums(values):
    dims = reduce_dims(values)
    values = values.float()
    return values.sum(dim=dims), values.square().sum(dim=dims)


def _per_sample_counts(condition):
    """Sum a boolean ``[N, C, *positions]`` tensor over positions, as float32 ``[N, C]``."""
    dims = tuple(range(2, condition.dim()))
    counts = condition.to(torch.float32)
    return counts.sum(dim=dims) if dims else counts


def _zero_sums(activated):
    """Return (zero count, active samples) per filter of ``[N, C, *positions]``."""
    zeros = _per_sample_counts(activated == 0)  # [N, C]
    positions = activated[0, 0].numel()
    return zeros.sum(dim=0), (zeros < positions).sum(dim=0)


def _nonpositive_sums(values):
    """Return (count of values <= 0, active samples) per filter, reading `values` once."""
    nonpositive = _per_sample_counts(values <= 0).sum(dim=0)
    nonzero = _per_sample_counts(values != 0)
    return nonpositive, (nonzero > 0).sum(dim=0)


def _nonpositive_count(pre_activation):
    """Return the count per filter of pre-activation values <= 0."""
    return _per_sample_counts(pre_activation <= 0).sum(dim=0)


def _gradient_signal_sums(grad_output):
    dims = tuple(range(2, grad_output.dim()))
    grad = grad_output.float()
    signal = grad.square().sum(dim=dims).sqrt() if dims else grad.abs()  # [N, C]
    return signal.sum(dim=0), signal.square().sum(dim=0)


def _batch_variance(values):
    variance, _ = torch.var_mean(values.float(), dim=reduce_dims(values), correction=0)
    return variance


class Kernels:
    """The statistic kernels, eager or compiled with torch.compile into fused single passes.

    Compiled kernels read each tensor once (the eager count of non-zeros alone takes about 10x
    a sum on CPU). The first call of each kernel compiles it, which takes seconds. A kernel
    that fails to compile falls back to eager for the rest of the process, with one log line.
    """

    NAMES = ("output_sums", "zero_sums", "nonpositive_sums", "nonpositive_count",
             "gradient_signal_sums", "batch_variance")

    def __init__(self, compiled):
        self.compiled = compiled
        self.eager = {name: globals()["_" + name] for name in self.NAMES}
        self.active = dict(self.eager)
        if compiled:
            for name, function in self.eager.items():
                self.active[name] = torch.compile(function, dynamic=True)

    def __getattr__(self, name):
        active = self.__dict__.get("active", {})
        if name not in active:
            raise AttributeError(name)
        return partial(self.run, name)

    def run(self, name, *tensors):
        try:
            return self.active[name](*tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: use eager
            if self.active[name] is self.eager[name]:
                raise
            logger.warning("torch.compile failed for probe kernel %s, using eager: %s", name,
                           error)
            self.active[name] = self.eager[name]
            return self.eager[name](*tensors)


_KERNELS = {}


def kernels(compiled):
    """Return the process-wide eager or compiled `Kernels`, so each compiles only once."""
    if compiled not in _KERNELS:
        _KERNELS[compiled] = Kernels(compiled)
    return _KERNELS[compiled]


def saved_tensor_hooks_active():
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is None or top_hooks(False) is not None


def saved_batch_variance(norm, output):
    """Return the batch variance [C] that a CPU batch norm saved for backward, or None.

    Batch norm in training mode saves ``1 / sqrt(var + eps)`` for its backward; reading it
    back costs no pass over the activations. Under saved-tensor hooks (activation
    checkpointing, offloading) reading a saved tensor can run those hooks, so it is not read.
    """
    if saved_tensor_hooks_active():
        return None
    grad_fn = getattr(output, "grad_fn", None)
    if type(grad_fn).__name__ != "NativeBatchNormBackward0" or not grad_fn._saved_training:
        return None
    inverse_std = grad_fn._saved_result2.detach().float()
    return inverse_std.square().reciprocal() - norm.eps


def batch_norm_gain(kernel_set, norm, batch_input, output):
    """Return (gain [C], batch variance [C] or None) of a batch norm for this call.

    The gain is ``weight / sqrt(var + eps)`` with the batch variance in training mode (or when
    the module keeps no running statistics) and the running variance in eval mode.
    """
    use_batch_stats = norm.training or norm.running_var is None
    if use_batch_stats:
        variance = saved_batch_variance(norm, output)
        if variance is None:
            variance = kernel_set.batch_variance(batch_input)
    else:
        variance = norm.running_var.float()
    gain = torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        gain = gain * norm.weight.detach().float()
    return gain, (variance if use_batch_stats else None)


def filter_norms(weight):
    """Return the L2 norm of each output filter's slice of a weight ``[C_out, ...]``."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)


def weight_norms(weight, grad, before):
    """Return (grad norm, weight norm, update norm) per filter; one pass over each tensor."""
    return filter_norms(grad), filter_norms(weight), filter_norms(weight - before)


def safe_ratio(numerator, denominator):
    """Divide, returning 0 where both are 0 (no signal) and keeping NaN/Inf otherwise."""
    ratio = numerator / denominator
    both_zero = (numerator == 0) & (denominator == 0)
    return torch.where(both_zero, torch.zeros_like(ratio), ratio)


def finalize_metrics(sums, grad_norm, weight_norm, update_norm):
    """Turn partial sums ``[len(SUMS), C]`` and norms ``[C]`` into metrics ``[C, len(METRICS)]``."""
    column = {name: sums[i] for name, i in SUM_INDEX.items()}
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
