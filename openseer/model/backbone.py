"""The trunk: any timm model by name (pooled features out), including SEER's RegNetYs.

SEER's architectures are timm's ``regnety_320/640/1280/2560`` (docs/method.md §2) and the 2022 RegNet-10B,
which timm lacks: ``seer_regnet_10b`` is built here from its pycls numbers with timm's ``RegNetCfg``
and registered with timm, so ``timm.create_model('seer_regnet_10b')`` works once openseer is
imported. Large ones can be built on the meta device (no memory) for planning. ``channels_last`` is applied where it is
faster (convnets on CPU and GPU).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.regnet import RegNet, RegNetCfg
from torch import nn

from ..config import OpenseerError

SEER_ARCHS = {
    "regnety_320": "RG-32GF",
    "regnety_640": "RG-64GF",
    "regnety_1280": "RG-128GF",
    "regnety_2560": "RG-256GF",
    "seer_regnet_10b": "RG-10B",
}

# SEER 2022 RegNet-10B (docs/method.md §2): depth 27, w0 1744, wa 620.83, wm 2.52, group width 1010, SE 0.25,
# stem 32 -> stage widths 2020, 4040, 11110, 28280, depths 2, 7, 17, 1; 9.32B trunk parameters.
SEER_10B_CFG = RegNetCfg(depth=27, w0=1744, wa=620.83, wm=2.52, group_size=1010, bottle_ratio=1.0,
                         se_ratio=0.25, stem_width=32)


def _regnet_from_cfg(cfg: RegNetCfg, kwargs: dict) -> RegNet:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        if kwargs.pop(key, None) and key == "features_only":
            raise BackboneError("features_only is not supported for seer_regnet_10b")
    return RegNet(cfg, **kwargs)


if "seer_regnet_10b" not in timm.list_models():

    @register_model
    def seer_regnet_10b(pretrained: bool = False, **kwargs) -> RegNet:
        """SEER's RegNet-10B trunk (random init; no published timm weights)."""
        if pretrained:
            raise BackboneError("seer_regnet_10b has no pretrained weights in timm")
        return _regnet_from_cfg(SEER_10B_CFG, kwargs)


class BackboneError(OpenseerError, ValueError):
    """An unknown or unusable backbone name."""


def build_backbone(arch: str, zero_init_last: bool = True, device: str | torch.device = "cpu",
                   stem_stride: int = 0, in_chans: int = 3) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``: an nn.Module mapping images to pooled features.

    ``zero_init_last=False`` switches off timm's zero-init of each residual block's last norm, which
    otherwise makes a randomly initialised network's features nearly constant. ``stem_stride``
    (when > 0) replaces the stride of the first convolution: 1 keeps full resolution through the stem
    for small images (the usual CIFAR-style adaptation; same weights and keys, more compute).
    ``in_chans``: the image channels the stem takes (1 for grayscale scans; timm's ``in_chans``).
    """
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:10]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise BackboneError(f"unknown backbone {arch!r} (any timm model name works){hint}")
    kwargs = {"num_classes": 0, "pretrained": False, **({"in_chans": in_chans} if in_chans != 3 else {})}
    with torch.device(device):
        try:
            model = timm.create_model(arch, zero_init_last=zero_init_last, **kwargs)
        except TypeError:
            model = timm.create_model(arch, **kwargs)
    if stem_stride:
        set_stem_stride(model, stem_stride)
    guard_strided_convs_on_1x1_inputs(model)
    return model


def stem_conv_key(model: nn.Module) -> str | None:
    """State-dict key of the weight of the model's first convolution (the stem), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.weight"
    return None


def adapt_stem(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    """Adapt the stem convolution of ``state`` (weights for ``model``'s architecture) to the input
    channels of ``model`` in place, as timm does for pretrained weights (``adapt_input_conv``: summed
    RGB filters for 1 channel, repeated and rescaled ones for N); returns what was done ('' if nothing)."""
    from timm.models import adapt_input_conv

    key = stem_conv_key(model)
    if key is None or key not in state:
        return ""
    want, have = model.state_dict()[key].shape, state[key].shape
    if len(have) != 4 or len(want) != 4 or have[1] == want[1] or have[0] != want[0] or have[2:] != want[2:]:
        return ""
    try:
        state[key] = adapt_input_conv(int(want[1]), state[key], base_chans=int(have[1]))
    except (NotImplementedError, ValueError, AssertionError):
        return ""
    return f"{key}: {have[1]} -> {want[1]} input channels (timm adapt_input_conv)"


def set_stem_stride(model: nn.Module, stride: int) -> nn.Conv2d:
    """Set the stride of the model's first convolution (its stem); returns that convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise BackboneError("model.stem_stride needs a convolutional backbone (no Conv2d found)")
    conv.stride = (stride, stride)
    if hasattr(conv, "_openseer_stride"):  # guarded (see below): the guard restores this stride
        conv._openseer_stride = conv.stride
    return conv


def _stride_one_on_1x1(conv: nn.Conv2d, args: tuple) -> None:
    x = args[0]
    conv.stride = (1, 1) if x.shape[-2:] == (1, 1) else conv._openseer_stride


def guard_strided_convs_on_1x1_inputs(model: nn.Module) -> int:
    """Run 'same'-padded strided convs at stride 1 when their input is 1x1 (same output, same gradients).

    Small crops (16 px) reach RegNetY's last stage as 1x1 maps. On such an input a k x k conv with
    padding (k-1)/2 sees only its centre tap and gives one output pixel at any stride, so stride 1
    is the same function. It avoids a CPU kernel bug (torch 2.14.1 / oneDNN): the bf16
    channels_last backward of a strided grouped conv on a 1x1 input returns NaN or garbage weight
    gradients in most steps (measured: 18 of 20 calls), which the loop then skips. Returns the
    number of convs guarded.
    """
    n = 0
    for conv in model.modules():
        if (isinstance(conv, nn.Conv2d) and max(conv.stride) > 1 and isinstance(conv.padding, tuple)
                and all(k == 2 * p + 1 for k, p in zip(conv.kernel_size, conv.padding))
                and all(d == 1 for d in conv.dilation)):
            conv._openseer_stride = conv.stride
            conv.register_forward_pre_hook(_stride_one_on_1x1)
            n += 1
    return n


def _retype_convs(model: nn.Module, cls: type[nn.Conv2d], chosen) -> int:
    """Give every plain ``nn.Conv2d`` for which ``chosen(conv)`` holds the class ``cls`` (a subclass with
    another forward/backward: same parameters and state_dict keys); returns how many."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d and chosen(m)]
    for conv in convs:
        conv.__class__ = cls
    return len(convs)


class _PointwiseConv(torch.autograd.Function):
    """conv2d(x, w) for a 1x1 kernel, forward as the convolution, backward as two matmuls on NHWC views."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        n, c_in, h, wd = x.shape
        g2 = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])  # (pixels, c_out): a view when channels_last
        w2 = w.flatten(1).to(g2.dtype)
        gx = (g2 @ w2).view(n, h, wd, c_in).permute(0, 3, 1, 2)
        gw = (g2.t() @ x.permute(0, 2, 3, 1).reshape(-1, c_in).to(g2.dtype)).view_as(w).to(w.dtype)
        return gx, gw


class PointwiseConv2d(nn.Conv2d):
    """A 1x1, stride-1, ungrouped, bias-free convolution whose backward runs as matrix multiplies.

    On channels_last tensors the NHWC view is a (pixels x channels) matrix, so both gradients are
    single GEMMs, where oneDNN's convolution backward is several times slower than its forward at
    small map sizes (measured on the tiny-cpu model in bf16: 1x1 convs fwd+bwd 141 ms as
    convolutions, 81 ms as matmuls). Same weights, keys and forward; other layouts, and GPUs (where
    cuDNN's backward is not slow; not measured), use the convolution's own backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or not torch.is_grad_enabled()
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        return _PointwiseConv.apply(x, self.weight)


def pointwise_convs_as_matmul(model: nn.Module) -> int:
    """Give every 1x1 / stride-1 / ungrouped / bias-free ``Conv2d`` a matmul backward; returns how many.

    The modules become ``PointwiseConv2d`` in place (same parameters and state_dict keys)."""
    return _retype_convs(model, PointwiseConv2d, lambda c: (
        c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1 and c.bias is None
        and c.padding in ((0, 0), "valid") and c.dilation == (1, 1) and c.padding_mode == "zeros"))


NARROW_GROUP = 16  # channels per group below which bf16 grouped convs lose to fp32 on AMX


class NarrowGroupConv2d(nn.Conv2d):
    """A grouped convolution with fewer than ``NARROW_GROUP`` channels per group that runs in fp32
    under CPU autocast.

    AMX multiplies bf16 on 16-row x 32-column tiles; a group of 8 channels fills a fraction of one,
    and oneDNN's bf16 kernels for such convs ran at half the speed of its fp32 ones here (all of
    regnetx_002's grouped convs at 12-24 px, fwd+bwd: 111 ms bf16, 56 ms fp32; the tiny-cpu step
    1.3x faster). From 16 channels per group up bf16 wins (2-5x at 14 px), and on a CPU without AMX
    the tiny step was unchanged. Same weights and keys; outside CPU autocast a plain convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return self._conv_forward(x.float(), self.weight, self.bias)


def narrow_group_convs_in_fp32(model: nn.Module) -> int:
    """Make every grouped ``Conv2d`` with fewer than ``NARROW_GROUP`` channels per group a
    ``NarrowGroupConv2d`` in place (same parameters and state_dict keys); returns how many."""
    return _retype_convs(model, NarrowGroupConv2d, lambda c: c.groups > 1 and c.in_channels // c.groups < NARROW_GROUP)


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features: timm's ``head_hidden_size`` where a head layer follows the pooling
    even with ``num_classes=0`` (MobileNetV3's conv_head: 288 -> 1024), else ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
