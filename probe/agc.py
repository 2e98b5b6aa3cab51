"""Automatic gain control (AGC): a per-sample normaliser for convolution outputs.

A reconstruction from the abstract of B. Ruff, "Deep Control" (2017, arXiv 1706.03907), which
describes a scaled per-sample map-mean subtraction from the raw filter output followed by a
scaling of the difference. For a bias-free convolution output ``z`` [N, C, *spatial] and each
sample n and filter c::

    m[n, c] = mean of z[n, c] over the spatial positions
    a[c]    = sigmoid(mean_scale_logit[c])              learned, kept in (0, 1)
    g[n, c] = 1 / sqrt(mean over positions of (z[n, c] - a[c] m[n, c])^2 + eps)
    y[n, c] = weight[c] * g[n, c] * (z[n, c] - a[c] m[n, c]) + bias[c]

The statistics belong to one sample, so a sample's output never depends on the rest of its
batch, and there are no running statistics: training and inference run the same function.

Two autograd functions implement the rule. The plain one keeps its input and the per-sample
values ``m`` and ``g`` for backward, one full-size tensor as batch norm keeps. The in-place one
fuses the layer with a leaky ReLU, overwrites its input with its output and rebuilds what
backward needs from that output, the technique of in-place activated batch norm. The next
convolution keeps that output anyway, so the layer adds no full-size tensor of its own.

NOTE: float16 and bfloat16 inputs compute the statistics in their own dtype. Only float32 and
float64 are tested.
"""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

SPATIAL_DIMS = (1, 2, 3)

# Initial a and gamma; docs/agc.md has the trials behind them.
DEFAULT_MEAN_SCALE = 0.95
DEFAULT_WEIGHT = 4.0


# --- plain formula (reference for tests; autograd differentiates it) -------------------------


def auto_gain_control_reference(z, weight, bias, mean_scale_logit, eps=1e-5):
    """Apply the AGC rule to ``z`` [N, C, *spatial] with plain tensor operations."""
    dims = tuple(range(2, z.dim()))
    shape = (1, -1) + (1,) * len(dims)

    mean_scale = torch.sigmoid(mean_scale_logit).view(shape)
    centred = z - mean_scale * z.mean(dims, keepdim=True)
    gain = torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    return weight.view(shape) * gain * centred + bias.view(shape)


# --- shared per-sample statistics -----------------------------------------------------------


def _centre(z, mean_scale, eps, out=None):
    """Return ``z - a m`` [N, C, *spatial], the map mean ``m`` [N, C] and the gain ``g`` [N, C].

    Two vectorised reductions, the mean of ``z`` and the norm of ``z - a m``. On CPU with
    torch 2.13 they took less than a tenth of the time of ``torch.var_mean`` over the trailing dimensions
    of [64, 128, 8, 8]. The norm of the centred values keeps ``g`` accurate when ``a`` is near 1
    and the spatial variance is small next to ``m^2``. ``out`` receives ``z - a m`` and may be
    ``z`` itself.
    """
    dims = tuple(range(2, z.dim()))
    positions = z[0, 0].numel()
    mean = z.mean(dims)
    centred = torch.sub(z, _broadcastable(mean_scale * mean, z), out=out)
    norm = torch.linalg.vector_norm(centred, 2, dims)
    gain = torch.rsqrt(norm * norm / positions + eps)
    return centred, mean, gain


def _channel_shape(z):
    """Shape [1, C, 1, ...] of a per-filter value broadcast against ``z``."""
    return (1, -1) + (1,) * (z.dim() - 2)


def _broadcastable(values, z):
    """View per-sample values [N, C] as [N, C, 1, ...] to broadcast against ``z``."""
    return values.view(values.shape + (1,) * (z.dim() - 2))


class _AutoGainControlFunction(torch.autograd.Function):
    """AGC forward that keeps ``z`` plus per-sample ``m`` and ``g`` for backward."""

    @staticmethod
    def forward(ctx, z, weight, bias, mean_scale_logit, eps):
        mean_scale = torch.sigmoid(mean_scale_logit)
        centred, mean, gain = _centre(z, mean_scale, eps)

        # The centred values are a temporary of this call, so the output overwrites them.
        scale = weight * gain
        y = torch.addcmul(bias.view(_channel_shape(z)), centred, _broadcastable(scale, z), out=centred)

        ctx.save_for_backward(z, weight, mean_scale, mean, gain)
        ctx.mark_non_differentiable(scale)
        return y, scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_scale):
        z, weight, mean_scale, mean, gain = ctx.saved_tensors

        # xhat = g (z - a m): batch norm's formula with mean a m and inverse std g per sample.
        grad_z, sum_grad, sum_grad_normalised = _per_sample_batch_norm_backward(
            grad_y, z, mean_scale * mean, gain, weight.expand_as(mean)
        )
        mean_grad_centred = _add_mean_terms(
            grad_z, sum_grad, sum_grad_normalised, weight, mean_scale, mean, gain
        )

        grad_weight = sum_grad_normalised.sum(0)
        grad_bias = sum_grad.sum(0)
        grad_logit = _grad_mean_scale_logit(mean_grad_centred, mean, mean_scale, z[0, 0].numel())
        return grad_z, grad_weight, grad_bias, grad_logit, None


class _InPlaceAutoGainControlLeakyReLUFunction(torch.autograd.Function):
    """AGC then leaky ReLU, written over ``z``; backward rebuilds ``xhat`` from the output.

    The effective scale is ``|weight| + eps`` so that ``xhat = (y - bias) / scale`` is defined.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, mean_scale_logit, eps, negative_slope):
        mean_scale = torch.sigmoid(mean_scale_logit)
        _, mean, gain = _centre(z, mean_scale, eps, out=z)

        effective_weight = weight.abs() + eps
        scale = effective_weight * gain
        torch.addcmul(bias.view(_channel_shape(z)), z, _broadcastable(scale, z), out=z)
        F.leaky_relu_(z, negative_slope)

        ctx.mark_dirty(z)
        ctx.mark_non_differentiable(scale)
        ctx.negative_slope = negative_slope
        ctx.save_for_backward(z, weight, effective_weight, bias, mean_scale, mean, gain)
        return z, scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_scale):
        out, weight, effective_weight, bias, mean_scale, mean, gain = ctx.saved_tensors
        slope = ctx.negative_slope

        # Undo the leaky ReLU: its input has the sign of its output, so a slope of 1/slope inverts it.
        y = F.leaky_relu(out, 1.0 / slope)
        grad_y = torch.ops.aten.leaky_relu_backward(grad_out, out, slope, True)

        # xhat = (y - bias) / s with s = |weight| + eps; batch norm's formula with mean bias and
        # inverse std 1/s then needs the scale s^2 g to produce the factor s g.
        batch_scale = (effective_weight * effective_weight) * gain
        grad_z, sum_grad, sum_grad_normalised = _per_sample_batch_norm_backward(
            grad_y, y, bias.expand_as(mean), (1.0 / effective_weight).expand_as(mean), batch_scale
        )
        mean_grad_centred = _add_mean_terms(
            grad_z, sum_grad, sum_grad_normalised, effective_weight, mean_scale, mean, gain
        )

        grad_weight = sum_grad_normalised.sum(0) * torch.sign(weight)
        grad_bias = sum_grad.sum(0)
        grad_logit = _grad_mean_scale_logit(mean_grad_centred, mean, mean_scale, out[0, 0].numel())
        return grad_z, grad_weight, grad_bias, grad_logit, None, None


def _per_sample_batch_norm_backward(grad_y, x, x_mean, x_invstd, scale):
    """Return batch norm's input gradient with statistics per (sample, filter), and its sums.

    For ``x`` [N, C, *spatial] and per-sample ``x_mean``, ``x_invstd``, ``scale`` [N, C], with
    ``xhat = (x - x_mean) x_invstd`` and M positions, returns::

        dx = scale x_invstd (dy - S1 / M - xhat S2 / M),   S1 = sum dy,   S2 = sum dy xhat

    with ``S1`` and ``S2`` [N, C]. Contiguous float32 and float64 tensors go through batch
    norm's native backward on the view [1, N*C, M], whose channels are then (sample, filter)
    pairs. Other layouts and dtypes take a plain path, which allocates ``xhat`` as well.
    """
    samples, channels = grad_y.shape[:2]
    fused = (
        x.dtype in (torch.float32, torch.float64)
        and grad_y.dtype == x.dtype
        and x.is_contiguous()
        and grad_y.is_contiguous()
    )
    if fused:
        flat = (1, samples * channels, -1)
        grad_x, sum_grad_normalised, sum_grad = torch.ops.aten.native_batch_norm_backward(
            grad_y.view(flat), x.view(flat), scale.reshape(-1), None, None,
            x_mean.reshape(-1), x_invstd.reshape(-1), True, 0.0, [True, True, True],
        )
        shape = (samples, channels)
        return grad_x.view(grad_y.shape), sum_grad.view(shape), sum_grad_normalised.view(shape)

    dims = tuple(range(2, x.dim()))
    positions = x[0, 0].numel()
    normalised = (x - _broadcastable(x_mean, x)) * _broadcastable(x_invstd, x)
    sum_grad = grad_y.sum(dims)
    sum_grad_normalised = (grad_y * normalised).sum(dims)

    factor = scale * x_invstd
    grad_x = torch.addcmul(
        _broadcastable(-factor * sum_grad / positions, x), grad_y, _broadcastable(factor, x)
    )
    grad_x.addcmul_(normalised, _broadcastable(-factor * sum_grad_normalised / positions, x))
    return grad_x, sum_grad, sum_grad_normalised


def _add_mean_terms(grad_z, sum_grad, sum_grad_normalised, weight, mean_scale, mean, gain):
    """Turn batch norm's input gradient into AGC's, in place; return mean(dL/du) [N, C].

    With ``u = z - a m``, ``xhat = g u``, ``k = weight g`` and M positions, AGC's gradient is
    ``dz = k dy - k xhat S2 / M - a mean(du)`` with ``mean(du) = k (S1 - mean(xhat) S2) / M``.
    Batch norm's subtracts ``k S1 / M`` in place of ``a mean(du)``, so the two differ by
    ``k (S1 (1 - a) + a mean(xhat) S2) / M`` per (sample, filter).
    """
    positions = grad_z[0, 0].numel()
    k_over_positions = (weight * gain).div_(positions)
    mean_normalised = gain * (1 - mean_scale) * mean

    # With P = k S1 / M: mean(du) = P - k mean(xhat) S2 / M, and the difference is P - a mean(du).
    bn_mean_term = k_over_positions * sum_grad
    mean_grad_centred = torch.addcmul(bn_mean_term, k_over_positions.mul_(mean_normalised),
                                      sum_grad_normalised, value=-1)
    correction = torch.addcmul(bn_mean_term, mean_scale.expand_as(mean), mean_grad_centred, value=-1)
    grad_z.add_(_broadcastable(correction, grad_z))
    return mean_grad_centred


def _grad_mean_scale_logit(mean_grad_centred, mean, mean_scale, positions):
    """dL/dp for ``a = sigmoid(p)``: ``dL/da = -sum over n of m sum(du)``."""
    grad_mean_scale = -(mean * mean_grad_centred).sum(0) * positions
    return grad_mean_scale * mean_scale * (1 - mean_scale)


# --- modules ---------------------------------------------------------------------------------


class AutoGainControl(nn.Module):
    """Per-sample automatic gain control for convolution outputs [N, C, *spatial].

    Input and output have the same shape and memory format: [N, C, L], [N, C, H, W] or
    [N, C, D, H, W], channels-last included. Parameters: ``weight`` [C] (``gamma``, the learned
    scale), ``bias`` [C] (``b``) and ``mean_scale_logit`` [C] (``a = sigmoid(logit)``, the share
    of the per-sample map mean that is subtracted). No buffers: the state dict holds only these.

    After each forward, ``last_gain`` is a detached float32 tensor [C]: the batch mean of
    ``weight[c] * g[n, c]``, the multiplier the layer applied to filter c. It is ``None`` before
    the first forward. The probe records it as the ``gain`` metric. The layer keeps the
    per-sample multipliers [N, C] of the last forward and averages them when ``last_gain`` is
    read, so the record costs nothing until someone reads it.

    Args:
        num_features: C, the number of filters of the convolution before this layer.
        eps: added to the mean square before the square root; must be > 0.
        mean_scale: initial ``a``, in (0, 1).
        weight: initial ``gamma`` for every filter. With ``bias`` 0, each layer undoes the
            scale of its input, so in a chain of conv, AGC and ReLU blocks ``weight`` sets the
            scale of what reaches the classifier. The defaults (``a`` 0.95, ``gamma`` 4) trained
            the small CNN of ``benchmarks/agc_trials.py`` at both lr 0.05 and 0.01. With
            ``gamma`` 1, lr 0.01 trained slowly (74 % after 5 epochs at ``a`` 0.5, 53 % at 0.95).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, mean_scale: float = DEFAULT_MEAN_SCALE,
                 weight: float = DEFAULT_WEIGHT, device=None, dtype=None):
        super().__init__()
        _check_hyperparameters(num_features, eps, mean_scale, weight)
        self.num_features = num_features
        self.eps = float(eps)

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.full((num_features,), float(weight), **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        logit = math.log(mean_scale / (1 - mean_scale))
        self.mean_scale_logit = nn.Parameter(torch.full((num_features,), logit, **factory))
        self._last_scale: torch.Tensor | None = None

    @property
    def mean_scale(self) -> torch.Tensor:
        """``a`` [C], the share of the per-sample map mean subtracted, detached."""
        return torch.sigmoid(self.mean_scale_logit.detach())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(self, z)
        y, scale = _AutoGainControlFunction.apply(
            z, self.weight, self.bias, self.mean_scale_logit, self.eps
        )
        self._last_scale = scale.detach()
        return y

    @property
    def last_gain(self) -> torch.Tensor | None:
        """Batch mean [C] of ``weight[c] * g[n, c]`` in the last forward, float32, detached."""
        if self._last_scale is None:
            return None
        return self._last_scale.mean(0).float()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class AutoGainControlLeakyReLU(AutoGainControl):
    """AutoGainControl fused with a leaky ReLU, computed in place over its input.

    The output is ``leaky_relu(AGC(z), negative_slope)`` with the scale ``|weight| + eps`` in
    place of ``weight``, written into ``z``. Nothing else may read ``z`` afterwards, which holds
    for a convolution output that only feeds this layer. Backward rebuilds the normalised values
    from the output, so the layer keeps no full-size tensor of its own. ``last_gain`` uses the
    same scale ``|weight| + eps``.
    """

    def __init__(self, num_features: int, negative_slope: float = 0.01, eps: float = 1e-5,
                 mean_scale: float = DEFAULT_MEAN_SCALE, weight: float = DEFAULT_WEIGHT,
                 device=None, dtype=None):
        super().__init__(num_features, eps, mean_scale, weight, device, dtype)
        if not (isinstance(negative_slope, (int, float)) and negative_slope > 0):
            raise ValueError(
                f"invalid negative_slope {negative_slope!r}: the in-place layer inverts the "
                "leaky ReLU in backward, so the slope must be a number > 0"
            )
        self.negative_slope = float(negative_slope)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(self, z)
        if z.is_leaf and z.requires_grad:
            raise ValueError(
                f"{type(self).__name__} writes its output over its input, which autograd forbids "
                "for a leaf tensor that requires grad; pass a computed tensor such as a "
                "convolution output, or use AutoGainControl"
            )
        y, scale = _InPlaceAutoGainControlLeakyReLUFunction.apply(
            z, self.weight, self.bias, self.mean_scale_logit, self.eps, self.negative_slope
        )
        self._last_scale = scale.detach()
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}"


def _check_hyperparameters(num_features, eps, mean_scale, weight) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"invalid num_features {num_features!r}: expected a positive integer")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"invalid eps {eps!r}: expected a finite number > 0, such as 1e-5")
    if not (isinstance(mean_scale, (int, float)) and 0 < mean_scale < 1):
        raise ValueError(
            f"invalid mean_scale {mean_scale!r}: expected a number strictly between 0 and 1, "
            "since a = sigmoid(logit) never reaches either end"
        )
    if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
        raise ValueError(f"invalid weight {weight!r}: expected a finite number, such as 1.0")


def _check_input(layer: AutoGainControl, z: torch.Tensor) -> None:
    if z.dim() - 2 not in SPATIAL_DIMS:
        raise ValueError(
            f"{type(layer).__name__} expected input [N, C, L], [N, C, H, W] or [N, C, D, H, W], "
            f"got shape {tuple(z.shape)}; it needs spatial positions to average over"
        )
    if z.numel() == 0:
        raise ValueError(
            f"{type(layer).__name__} got an empty input of shape {tuple(z.shape)}; it needs at "
            "least one sample, channel and spatial position"
        )
    if z.shape[1] != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__} has {layer.num_features} filters but the input has "
            f"{z.shape[1]} channels in dim 1 (shape {tuple(z.shape)}); build it with "
            f"num_features={z.shape[1]}"
        )


# --- conversion of a network -----------------------------------------------------------------

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


class _LeafTracer(torch.fx.Tracer):
    """Tracer that keeps AGC layers as single calls, since their autograd function cannot take proxies."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, AutoGainControl) or super().is_leaf_module(module, qualified_name)


def to_agc(model: nn.Module, keep_affine: bool = False) -> nn.Module:
    """Replace each batch norm that follows a convolution with an AutoGainControl, in place.

    The pairs come from the traced forward pass (``torch.fx``), not from module order: a batch
    norm is converted when its input is the output of an ``nn.Conv1d/2d/3d`` call. Tracing needs
    no example input and shows every consumer of the convolution output. A batch norm registered
    next to a convolution but fed from elsewhere is therefore not taken for its normaliser.

    Each new layer has the batch norm's width, eps, device and dtype and AutoGainControl's
    default initial values. With ``keep_affine=True`` it copies the batch norm's ``weight`` and
    ``bias`` instead, for fine-tuning a trained network. The convolution's bias is removed when
    the batch norm is its only consumer. Other modules are untouched. Returns ``model``, and
    calling it again on the result changes nothing.

    Raises:
        ValueError: the model has neither batch norm nor AGC layers, or a batch norm does not
            take a convolution output (the message names it).
        RuntimeError: ``torch.fx`` cannot trace the model (data-dependent control flow).
    """
    batch_norms = [name for name, module in model.named_modules() if _is_batch_norm(module)]
    if not batch_norms:
        if any(isinstance(module, AutoGainControl) for module in model.modules()):
            return model
        raise ValueError(
            f"to_agc found no batch norm to convert in {type(model).__name__}: it replaces "
            "nn.BatchNorm1d/2d/3d layers that follow convolutions"
        )

    pairs, shared_outputs = _trace_conv_batch_norm_pairs(model)
    unmapped = [name for name in batch_norms if name not in pairs]
    if unmapped:
        raise ValueError(
            f"to_agc cannot convert batch norm {', '.join(unmapped)}: in the traced forward "
            "pass it is not called, or its input is not the output of an nn.Conv1d/2d/3d with "
            "as many channels. Convert that layer by hand or remove it before calling to_agc"
        )

    for bn_name, conv_name in pairs.items():
        _replace_batch_norm(model, bn_name, conv_name, conv_name in shared_outputs, keep_affine)
    logger.info("to_agc replaced %d batch norm layers in %s", len(pairs), type(model).__name__)
    return model


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _trace_conv_batch_norm_pairs(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """Return {batch norm name: conv name} and the convs whose output also goes elsewhere."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # fx raises several types for untraceable code
        raise RuntimeError(
            f"to_agc could not trace {type(model).__name__} with torch.fx ({error}); it needs a "
            "forward pass without data-dependent control flow to see which convolution feeds "
            "each batch norm"
        ) from error

    modules = dict(model.named_modules())
    pairs, shared_outputs = {}, set()
    for node in graph.nodes:
        if node.op != "call_module" or not _is_batch_norm(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        if not _is_conv_call(source, modules, node.target):
            continue
        if node.target in pairs:
            raise ValueError(
                f"to_agc cannot convert batch norm {node.target}: it is called more than once "
                "in the forward pass"
            )
        pairs[node.target] = source.target
        if len(source.users) > 1:
            shared_outputs.add(source.target)
    return pairs, shared_outputs


def _is_conv_call(node, modules: dict, bn_name: str) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_module":
        return False
    conv = modules[node.target]
    if type(conv) not in _CONV_DIMS:
        return False
    return conv.out_channels == modules[bn_name].num_features


def _replace_batch_norm(model: nn.Module, bn_name: str, conv_name: str, keep_conv_bias: bool,
                        keep_affine: bool) -> None:
    batch_norm = model.get_submodule(bn_name)
    weight = batch_norm.weight
    factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
    layer = AutoGainControl(batch_norm.num_features, eps=batch_norm.eps, **factory)

    if keep_affine and batch_norm.affine:
        with torch.no_grad():
            layer.weight.copy_(batch_norm.weight)
            layer.bias.copy_(batch_norm.bias)

    parent_name, _, child_name = bn_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, layer)

    conv = model.get_submodule(conv_name)
    if conv.bias is not None and not keep_conv_bias:
        conv.bias = None
