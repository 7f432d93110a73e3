"""Perceptual distances used as training losses, DISTS, LPIPS-VGG and LPIPS-Alex, built without torchvision.

* DISTS: Ding, Ma, Wang & Simoncelli, "Image Quality Assessment: Unifying Structure and Texture Similarity"
  (TPAMI 2020), Sec. 3: L2-pooled VGG16 features, a texture term on global means and a structure term on
  global (co)variances, weighted by the learned ``alpha``, ``beta``.
* LPIPS v0.1 on VGG16 (OSEDiff's loss, ``lpips.LPIPS(net='vgg')``) and on AlexNet (TSD-SR's loss, pyiqa's
  ``lpips``, whose default trunk is AlexNet): Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
  Perceptual Metric" (CVPR 2018), eq. 1.

Both modules are frozen (no parameter wants a gradient) but differentiable with respect to their inputs, so they
serve as losses on a generator's output. The VGG16 and AlexNet stacks keep the indices of torchvision's
``vgg16().features`` and ``alexnet().features``, so torchvision's files load into them; the learned heads load from pyiqa's cache or from the files shipped in the
``dists-pytorch`` and ``lpips`` wheels. Nothing is downloaded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from d3sr_core.files import ModelFileError, read_state_dict

VGG16_FILE = "vgg16-397923af.pth"
"""torchvision's ImageNet VGG16: keys ``features.N.weight/bias`` (used) and ``classifier.*`` (ignored)."""
DISTS_FILES = ("DISTS_weights-f5e65c96.pth", "weights.pt")
"""pyiqa's cache name, then the ``dists-pytorch`` wheel's: ``{'alpha', 'beta'}``, each (1, 1475, 1, 1)."""
LPIPS_VGG_FILES = ("LPIPS_v0.1_vgg-a78928a0.pth", "vgg.pth")
"""pyiqa's cache name, then the ``lpips`` wheel's ``weights/v0.1/vgg.pth``: ``lin{k}.model.1.weight`` (1, C_k, 1, 1)."""
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
"""torchvision's ImageNet AlexNet: keys ``features.N.weight/bias`` (used) and ``classifier.*`` (ignored)."""
LPIPS_ALEX_FILES = ("LPIPS_v0.1_alex-df73285e.pth", "alex.pth")
"""pyiqa's cache name, then the ``lpips`` wheel's ``weights/v0.1/alex.pth``: ``lin{k}.model.1.weight``."""

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
"""torchvision's VGG16 ("D") up to relu5_3, index 29; the last max-pool (index 30) is used by neither metric."""
VGG16_TAPS = (3, 8, 15, 22, 29)
"""Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
VGG16_STAGE_CHANNELS = (64, 128, 256, 512, 512)
ALEXNET_TAPS = (1, 4, 7, 9, 11)
"""Indices of AlexNet's relu1 ... relu5 in torchvision's ``alexnet().features``."""
ALEXNET_STAGE_CHANNELS = (64, 192, 384, 256, 256)
ALEXNET_MIN_SIDE = 31
"""The smallest input side AlexNet's stride-4 stem and two 3x3 stride-2 pools leave a map for at relu3."""
DISTS_CHANNELS = (3, *VGG16_STAGE_CHANNELS)
"""DISTS's six representations: the image itself, then the five VGG stages (1475 channels in all)."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
"""LPIPS v0.1's scaling layer ``(x - shift) / scale``: [-1, 1] input to about ImageNet-normalised values."""
DISTS_C1 = DISTS_C2 = 1e-6
LPIPS_EPS = 1e-10


class PerceptualWeightsMissing(ModelFileError):
    """A weight file of a perceptual loss is in none of the searched folders. The message is one sentence."""


def torch_hub_dir() -> Path:
    """``$TORCH_HOME/hub``; ``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch`` (as torch)."""
    default_home = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", default_home))) / "hub"


def find_weight_file(
    names: tuple[str, ...] | str, search_dirs: list[Path] | None = None, *, what: str = "perceptual-loss weights"
) -> Path:
    """The first existing ``folder / name``, trying every name in each of ``search_dirs``, then in
    ``<torch hub>/checkpoints`` (torchvision's cache) and ``<torch hub>/pyiqa`` (pyiqa's cache)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    hub = torch_hub_dir()
    folders = [Path(d) for d in (search_dirs or [])] + [hub / "checkpoints", hub / "pyiqa"]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise PerceptualWeightsMissing(
        f"{' or '.join(repr(n) for n in names)} ({what}) is in none of {', '.join(map(str, folders))}; "
        "put the file into one of these folders (nothing is downloaded)."
    )


def _vgg16_features(pool: Callable[[int], nn.Module]) -> nn.Sequential:
    """VGG16 ``features[0:30]`` with torchvision's indices; ``pool(channels)`` builds the module at 4, 9, 16, 23."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append(pool(channels))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    """AlexNet ``features[0:12]`` with torchvision's indices (Krizhevsky's one-GPU variant, as torchvision's); the
    last max-pool (index 12) is not used by LPIPS."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),
    )


def _taps(trunk: nn.Sequential, h: torch.Tensor, taps: tuple[int, ...] = VGG16_TAPS) -> list[torch.Tensor]:
    """The outputs of ``trunk``'s layers at the indices ``taps`` for ``h`` (already normalised for the trunk)."""
    outputs = []
    for index, layer in enumerate(trunk):
        h = layer(h)
        if index in taps:
            outputs.append(h)
        if index >= taps[-1]:
            break
    return outputs




def _copy_tensors(path: Path, what: str, targets: dict[str, torch.Tensor]) -> None:
    """Copy the tensors named in ``targets`` from the file at ``path`` into them; the file's other keys are ignored
    (torchvision's classifier, or a trunk copy beside pyiqa's heads)."""
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path, what).items()}
    for key, target in targets.items():
        value = state.get(key)
        if value is None or value.shape != target.shape:
            problem = f"lacks '{key}'" if value is None else f"has '{key}' of shape {tuple(value.shape)}"
            raise ModelFileError(f"{path} {problem} where {tuple(target.shape)} is needed; expected {what}.")
        target.data.copy_(value)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Random init from ``seed`` (when given) without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


_Model = TypeVar("_Model", bound="_FrozenVGGDistance")


class _FrozenVGGDistance(nn.Module):
    """What DISTS and LPIPS share: a ``vgg`` with torchvision's keys, learned heads, loading from files, freezing."""

    head_files: tuple[str, ...] = ()  # subclasses also define _head_tensors(): {key in the head file: parameter}
    head_what = ""
    trunk_file = VGG16_FILE
    trunk_name = "VGG16"

    def _trunk(self) -> nn.Sequential:
        return self.vgg

    def _freeze(self) -> None:
        # Losses: gradients reach the input only. No dropout or batch norm is used, so eval() changes no number.
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls: type[_Model], search_dirs: list[Path] | None = None) -> _Model:
        """The trained model: the trunk (VGG16 from :data:`VGG16_FILE`, AlexNet from :data:`ALEXNET_FILE`) and the
        heads from ``head_files``, both found by :func:`find_weight_file` in ``search_dirs`` and the torch hub caches.
        Raises :class:`PerceptualWeightsMissing` when a file is missing and ``ModelFileError`` when one does not fit."""
        trunk_what = f"torchvision's ImageNet {cls.trunk_name} weights for {cls.__name__}, keys features.N.weight/bias"
        trunk_path = find_weight_file(cls.trunk_file, search_dirs, what=trunk_what)
        head_path = find_weight_file(cls.head_files, search_dirs, what=cls.head_what)
        model = cls()
        trunk_tensors = {f"features.{k}": v for k, v in model._trunk().state_dict(keep_vars=True).items()}
        _copy_tensors(trunk_path, trunk_what, trunk_tensors)
        _copy_tensors(head_path, cls.head_what, model._head_tensors())
        return model


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_size: int = 1) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4 or t.shape[1] != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} is {got}; expected a float tensor (B, 3, H, W).")
    if x.shape != y.shape or min(x.shape[-2:]) < min_size:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ in shape or are smaller than "
                         f"{min_size} x {min_size}; expected equal shapes of at least that size.")


def _stats_dtype(t: torch.Tensor) -> torch.dtype:
    # Variances and the 1e-6 / 1e-10 constants underflow in half precision: compute statistics in float32 or wider.
    return torch.promote_types(t.dtype, torch.float32)


class L2Pooling(nn.Module):
    """DISTS's L2 pooling (Ding et al. 2020, Sec. 3), used instead of max pooling because it does not alias:
    ``sqrt(g * x^2 + 1e-12)`` per channel, stride 2, zero padding 1, ``g`` the outer product of the size-5 Hanning
    window without its zero ends, ``[0.5, 1, 0.5]``, normalised to sum 1. ``(B, C, H, W) -> (B, C, ceil(H/2),
    ceil(W/2))``."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.tensor([0.5, 1.0, 0.5])
        g = torch.outer(w, w) / torch.outer(w, w).sum()
        # Not persistent: a constant, so the VGG's state dict keeps torchvision's keys only.
        self.register_buffer("filter", g.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x**2, self.filter.to(x.dtype), stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


def dists_structure_texture(
    feats_x: list[torch.Tensor], feats_y: list[torch.Tensor], alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """DISTS distance ``(B,)`` from two lists of representations ``(B, C_i, H_i, W_i)`` (Ding et al. 2020, Sec. 3).

    Per channel ``j`` of representation ``i``, with global means ``mu``, variances ``sigma^2`` and covariance
    ``sigma_xy`` over space: texture ``l = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)``, structure
    ``s = (2 sigma_xy + c2) / (sigma_x^2 + sigma_y^2 + c2)``, ``c1 = c2 = 1e-6``; the distance is
    ``D = 1 - sum_ij (alpha_ij l_ij + beta_ij s_ij)`` with ``alpha, beta`` divided by their joint sum so that
    the weights sum to 1. ``alpha``, ``beta``: ``sum_i C_i`` weights (any shape, e.g. (1, 1475, 1, 1)), split per
    representation by the channel counts of ``feats_x``.
    """
    counts = [f.shape[1] for f in feats_x]
    if len(feats_x) != len(feats_y) or alpha.numel() != sum(counts) or beta.numel() != sum(counts):
        raise ValueError(
            f"{len(feats_x)}/{len(feats_y)} representations with channels {counts} and alpha/beta of "
            f"{alpha.numel()}/{beta.numel()} weights; expected equal lists and {sum(counts)} weights each."
        )
    dtype = _stats_dtype(feats_x[0])
    total = alpha.sum() + beta.sum()
    a_split = torch.split((alpha / total).reshape(-1).to(dtype), counts)
    b_split = torch.split((beta / total).reshape(-1).to(dtype), counts)
    similarity = 0
    for fx, fy, a, b in zip(feats_x, feats_y, a_split, b_split):
        fx, fy = fx.to(dtype).flatten(2), fy.to(dtype).flatten(2)  # (B, C, HW)
        mx, my = fx.mean(-1), fy.mean(-1)
        dx, dy = fx - mx.unsqueeze(-1), fy - my.unsqueeze(-1)
        vx, vy = (dx * dx).mean(-1), (dy * dy).mean(-1)
        # Centred product: equal to the reference code's E[xy] - mu_x mu_y, without its float32 cancellation,
        # and exactly sigma_x^2 when x == y, so DISTS(x, x) is 0 up to the rounding of the weights' sum.
        cov = (dx * dy).mean(-1)
        texture = (2 * mx * my + DISTS_C1) / (mx**2 + my**2 + DISTS_C1)
        structure = (2 * cov + DISTS_C2) / (vx + vy + DISTS_C2)
        similarity = similarity + (texture * a).sum(-1) + (structure * b).sum(-1)
    return 1 - similarity


class DISTS(_FrozenVGGDistance):
    """DISTS as a loss: ``forward(x, y)`` with ``x``, ``y`` ``(B, 3, H, W)`` float in [0, 1] returns ``(B,)``
    distances in about [0, 1] (0 for identical images), differentiable with respect to ``x`` (and ``y``).

    ``DISTS()`` has a random VGG16 (torch's default init) and ``alpha``, ``beta`` drawn from N(0.1, 0.01^2) as the
    reference code draws them; :meth:`from_files` loads the trained metric (VGG16 + :data:`DISTS_FILES`)."""

    head_files = DISTS_FILES
    head_what = "the DISTS weights, a dict of 'alpha' and 'beta', from pyiqa's cache or the dists-pytorch wheel"

    def __init__(self, seed: int | None = None):
        super().__init__()
        with _seeded(seed):
            self.vgg = _vgg16_features(L2Pooling)
            self.alpha = nn.Parameter(torch.empty(1, sum(DISTS_CHANNELS), 1, 1).normal_(0.1, 0.01))
            self.beta = nn.Parameter(torch.empty(1, sum(DISTS_CHANNELS), 1, 1).normal_(0.1, 0.01))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha, "beta": self.beta}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[x, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]`` for ``x`` ``(B, 3, H, W)`` in [0, 1]: the raw image
        first (as in DISTS), then the VGG stages of the ImageNet-normalised image, L2-pooled between stages."""
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return [x, *_taps(self.vgg, h)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        return dists_structure_texture(self.features(x), self.features(y), self.alpha, self.beta)


class LPIPS(_FrozenVGGDistance):
    """LPIPS v0.1 with the VGG16 trunk as a loss (Zhang et al. 2018, eq. 1): ``forward(x, y)`` with ``x``, ``y``
    ``(B, 3, H, W)`` float in [-1, 1], ``H, W >= 16``, returns ``(B,)``
    ``d = sum_l mean_hw || w_l * (f^l_x / |f^l_x| - f^l_y / |f^l_y|) ||^2`` over relu1_2 ... relu5_3, the features
    unit-normalised over channels (eps 1e-10), ``w_l`` the non-negative 1 x 1 "lin" heads (no bias). The trunk
    max-pools, as torchvision's VGG16 does.

    ``LPIPS()`` has a random trunk and random non-negative heads (``|default init|``); :meth:`from_files` loads
    the trained metric (VGG16 + :data:`LPIPS_VGG_FILES`, keys ``lin{k}.model.1.weight``)."""

    head_files = LPIPS_VGG_FILES
    head_what = "the LPIPS v0.1 VGG lin layers (lin0.model.1.weight ... lin4.model.1.weight) from pyiqa or lpips"

    def __init__(self, seed: int | None = None):
        super().__init__()
        with _seeded(seed):
            self.vgg = _vgg16_features(lambda _: nn.MaxPool2d(kernel_size=2, stride=2))
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in VGG16_STAGE_CHANNELS)
        for lin in self.lins:
            lin.weight.data.abs_()  # the trained heads are clamped non-negative, so a distance is never negative
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        # The lpips wheel's layout: lin{k}.model = Sequential(Dropout, Conv2d), so the conv is entry 1.
        return {f"lin{k}.model.1.weight": lin.weight for k, lin in enumerate(self.lins)}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1_2 ... relu5_3 of ``x`` ``(B, 3, H, W)`` in [-1, 1] after LPIPS's scaling layer."""
        return _taps(self.vgg, (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype))

    min_side = 16

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y, min_size=self.min_side)
        total = 0
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins):
            dtype = _stats_dtype(fx)
            fx, fy = fx.to(dtype), fy.to(dtype)
            # vector_norm, not sqrt(sum(f^2)): its gradient is 0 (not NaN) where all channels are 0 after the ReLU.
            nx = fx / (torch.linalg.vector_norm(fx, dim=1, keepdim=True) + LPIPS_EPS)
            ny = fy / (torch.linalg.vector_norm(fy, dim=1, keepdim=True) + LPIPS_EPS)
            total = total + F.conv2d((nx - ny) ** 2, lin.weight.to(dtype)).mean(dim=(1, 2, 3))
        return total


class LPIPSAlex(LPIPS):
    """LPIPS v0.1 with the AlexNet trunk, TSD-SR's perceptual loss (pyiqa's ``lpips``, whose ``as_loss`` on [0, 1]
    images equals this on the same images in [-1, 1]): ``forward(x, y)`` with ``x``, ``y`` ``(B, 3, H, W)`` float in
    [-1, 1], ``H, W >= 31``, returns ``(B,)`` distances (Zhang et al. 2018, eq. 1) over relu1 ... relu5.

    ``LPIPSAlex()`` has a random trunk and random non-negative heads; :meth:`from_files` loads the trained metric
    (:data:`ALEXNET_FILE` + :data:`LPIPS_ALEX_FILES`)."""

    head_files = LPIPS_ALEX_FILES
    head_what = "the LPIPS v0.1 AlexNet lin layers (lin0.model.1.weight ... lin4.model.1.weight) from pyiqa or lpips"
    trunk_file = ALEXNET_FILE
    trunk_name = "AlexNet"
    min_side = ALEXNET_MIN_SIDE

    def __init__(self, seed: int | None = None):
        nn.Module.__init__(self)
        with _seeded(seed):
            self.alexnet = _alexnet_features()
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in ALEXNET_STAGE_CHANNELS)
        for lin in self.lins:
            lin.weight.data.abs_()  # the trained heads are clamped non-negative, so a distance is never negative
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _trunk(self) -> nn.Sequential:
        return self.alexnet

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1 ... relu5 of ``x`` ``(B, 3, H, W)`` in [-1, 1] after LPIPS's scaling layer."""
        return _taps(self.alexnet, (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype), ALEXNET_TAPS)
