"""Find the probed layers of a model and classify the modules that may follow them.

Which normaliser and activation belong to a layer is decided while the model runs, in
`probe.hooks`. A layer's normaliser is the module that consumes the layer's output tensor. Its
activation is the module that consumes the normaliser's output, or the layer's output when
there is no normaliser. Dropout and identity modules in between are followed.
"""

import logging
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger(__name__)

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
PASS_THROUGH_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Activations whose inactive outputs are exact zeros: sparsity counts zeros after them.
RELU_FAMILY_TYPES = (nn.ReLU, nn.ReLU6)
ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Softsign, nn.Threshold, nn.LogSigmoid, nn.Tanhshrink,
)

# Prefixes added by wrappers, removed from layer names: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_agc(module):
    """Return True for the package's AutoGainControl layers (imported lazily)."""
    from probe.agc import AutoGainControl

    return isinstance(module, AutoGainControl)


def is_normaliser(module):
    return isinstance(module, BATCH_NORM_TYPES) or is_agc(module)


def fused_activation(module):
    """Return True for the AGC layer fused with a leaky ReLU, which is its own activation."""
    from probe.agc import AutoGainControlLeakyReLU

    return isinstance(module, AutoGainControlLeakyReLU)


def strip_wrapper_prefix(name):
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def unwrap_model(model):
    """Return the user's module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
                "OptimizedModule", "DistributedDataParallel", "DataParallel"):
            model = inner
            continue
        return model


@dataclass
class LayerSpec:
    """One probed layer: a module whose output channels are filters."""

    index: int
    name: str
    module: nn.Module
    filters: int
    channel_dim: int  # 1 for convolutions [N, C, *positions], -1 for Linear [N, *, F]
    normaliser_name: str | None = None
    normaliser: nn.Module | None = field(default=None, repr=False)
    activation_name: str | None = None
    activation: nn.Module | None = field(default=None, repr=False)
    depth: int | None = None

    def describe(self):
        """Return the layer's entry for run.json."""
        return {
            "name": self.name,
            "type": type(self.module).__name__,
            "filters": self.filters,
            "normaliser": self.normaliser_name,
            "normaliser_type": type(self.normaliser).__name__ if self.normaliser else None,
            "activation": self.activation_name,
            "activation_type": type(self.activation).__name__ if self.activation else None,
            "depth": self.depth,
        }


def find_layers(model):
    """Return a LayerSpec per Conv1d/2d/3d and Linear module, in module order."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        if isinstance(module, nn.Linear):
            filters, channel_dim = module.out_features, -1
        else:
            filters, channel_dim = module.out_channels, 1
        spec = LayerSpec(len(layers), strip_wrapper_prefix(name), module, filters, channel_dim)
        layers.append(spec)
    return layers


def number_unseen_layers(layers):
    """Give layers that the traced forward pass never called a depth after all called ones."""
    next_depth = 1 + max((s.depth for s in layers if s.depth is not None), default=-1)
    for spec in layers:
        if spec.depth is None:
            logger.info("layer %s was not called in the traced forward pass", spec.name)
            spec.depth = next_depth
            next_depth += 1
