"""Training pairs: high-resolution crops and their low-resolution versions.

Every random choice of a sample (crop, flip, degradation) is drawn from a generator seeded by the run's seed and
the sample's *position* in an endless epoch-shuffled stream, never from a worker's global state. So the batch at
any step is a pure function of (seed, step, rank): the same whatever the number of workers, and a resumed run
continues the stream exactly where the interrupted one stopped without replaying it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Sampler

from d3sr_core.image_io import ImageFileError, list_images, read_image, verified_images

from .degradation import DegradationConfig, real_esrgan_degrade


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit seed for one sample, decorrelated from neighbouring ids."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class StreamPosition:
    """Where a process reads in the stream: micro-batch ``micro_batch`` of size ``batch_size`` for ``rank`` of ``world``."""

    micro_batch: int
    batch_size: int
    rank: int = 0
    world: int = 1


class StreamSampler(Sampler[int]):
    """Endless sample ids for one process, from ``position`` on.

    Global slot ``p = (m * world + rank) * batch_size + j`` of micro-batch ``m`` holds sample id
    ``epoch * n + perm_epoch[p mod n]`` with ``epoch = p // n`` and ``perm_epoch`` a permutation seeded by
    ``(seed, epoch)``. The dataset reads the image index and the per-sample seed back from the id.
    """

    def __init__(self, size: int, seed: int, position: StreamPosition):
        self.size = size
        self.seed = seed
        self.position = position
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))}
        return self._perms[epoch]

    def __iter__(self):
        pos = self.position
        m = pos.micro_batch
        while True:
            for j in range(pos.batch_size):
                p = (m * pos.world + pos.rank) * pos.batch_size + j
                epoch = p // self.size
                yield epoch * self.size + int(self._permutation(epoch)[p % self.size])
            m += 1


def _open_rgb(path: Path) -> torch.Tensor:
    image = read_image(path).pixels
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].contiguous()


def _fit_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    """Enlarge (bicubic) an image whose short side is below ``crop`` so a crop fits."""
    short = min(image.shape[-2:])
    if short >= crop:
        return image
    factor = crop / short
    size = (max(crop, round(image.shape[-2] * factor)), max(crop, round(image.shape[-1] * factor)))
    return F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)


class SRPairDataset(Dataset):
    """``{"gt": (3, crop, crop), "lq": (3, crop / scale, crop / scale)}``, both float32 in [-1, 1].

    With only ``hr_dir``, LQ images are made from random HR crops by the Real-ESRGAN degradation. With ``lr_dir``
    too, the LQ image of the same name is cropped at the matching place (it must be exactly 1/scale the size).
    ``cache_images`` keeps decoded images in memory (each worker its own copy): for small datasets.
    With ``latent_dir`` (``python -m training.latents``) the HR crop's precomputed VAE latent comes too, as
    ``"gt_latent"`` ``(C, crop / f, crop / f)``, cut from the whole image's latent on the latent grid.
    With ``make_lq=False`` only ``"gt"`` is returned (methods that train on HR images alone).
    ``clean_prob``: the fraction of unpaired samples whose LQ image is the plain bicubic downscale (antialiased)
    instead of a degraded one; ``"degraded"`` (a bool scalar) says which a sample got (paired LQ counts as degraded).
    Indexed by sample ids from :class:`StreamSampler`.
    """

    def __init__(
        self,
        hr_dir: str | os.PathLike,
        *,
        crop_size: int,
        scale: int,
        seed: int,
        flip: bool = True,
        lr_dir: str | os.PathLike | None = None,
        degradation: DegradationConfig | None = None,
        make_lq: bool = True,
        cache_images: bool = False,
        latent_dir: str | os.PathLike | None = None,
        skip_bad_images: bool = False,
        clean_prob: float = 0.0,
    ):
        hr_dir = Path(hr_dir)
        if not hr_dir.is_dir():
            raise ValueError(f"data.hr_dir {hr_dir} is not a folder; expected a folder of high-resolution images.")
        # Checked now, so a bad image stops the run before step 1 (or is left out with skip_bad_images).
        self.hr_files = verified_images(list_images([hr_dir]), skip_bad=skip_bad_images,
                                        hint="fix or remove it, or set data.skip_bad_images: true to leave bad images out")
        if not self.hr_files:
            raise ValueError(f"data.hr_dir {hr_dir} holds no image files.")
        if crop_size % scale:
            raise ValueError(f"data.crop_size {crop_size} is not a multiple of data.scale {scale}.")
        self.lr_files = None
        if lr_dir is not None:
            by_stem = {f.stem: f for f in list_images([Path(lr_dir)])}
            missing = [f.name for f in self.hr_files if f.stem not in by_stem]
            if missing:
                raise ValueError(f"data.lr_dir {lr_dir} has no image named like {missing[0]} (pairs match by file name).")
            self.lr_files = [by_stem[f.stem] for f in self.hr_files]
        self.crop_size, self.scale, self.seed, self.flip, self.make_lq = crop_size, scale, seed, flip, make_lq
        self.cache_images = cache_images
        self._decoded: dict[Path, torch.Tensor] = {}
        self.latent_files, self.latent_factor = None, 1
        if latent_dir is not None:
            self.latent_files, self.latent_factor = _latent_files(Path(latent_dir), self.hr_files)
            if crop_size % (self.latent_factor * scale):
                raise ValueError(f"data.crop_size {crop_size} must be a multiple of {self.latent_factor * scale} with latents.")
        if not 0.0 <= clean_prob <= 1.0:
            raise ValueError(f"data.clean_prob {clean_prob!r} is not a probability between 0 and 1.")
        self.clean_prob = clean_prob
        self.degradation = degradation or DegradationConfig(scale=scale)
        if self.degradation.scale != scale:
            raise ValueError(f"data.degradation.scale {self.degradation.scale} differs from data.scale {scale}.")

    def _image(self, path: Path) -> torch.Tensor:
        """The decoded image; with ``cache_images`` kept in memory (as 8-bit), since decoding a large photo can
        take longer than a small model's training step."""
        if not self.cache_images:
            return _open_rgb(path)
        if path not in self._decoded:
            self._decoded[path] = (_open_rgb(path) * 255).round().to(torch.uint8)
        return self._decoded[path].float() / 255

    def __len__(self) -> int:
        return len(self.hr_files)

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        index = sample_id % len(self.hr_files)
        rng = torch.Generator().manual_seed(sample_seed(self.seed, sample_id))
        try:
            hr = self._image(self.hr_files[index])
            lr = self._image(self.lr_files[index]) if self.lr_files is not None and self.make_lq else None
        except ImageFileError as err:
            raise ValueError(f"training image cannot be read: {err}") from None
        crop, s = self.crop_size, self.scale
        if self.latent_files is not None and min(hr.shape[-2:]) < crop:
            raise ValueError(f"{self.hr_files[index].name} is smaller than data.crop_size {crop}; precomputed latents need every image at least that large.")
        if lr is None:
            hr = _fit_crop(hr, crop)
        elif tuple(hr.shape[-2:]) != (lr.shape[-2] * s, lr.shape[-1] * s) or min(lr.shape[-2:]) * s < crop:
            raise ValueError(
                f"{self.lr_files[index].name} is {lr.shape[-1]}x{lr.shape[-2]}, but its HR image is "
                f"{hr.shape[-1]}x{hr.shape[-2]}: expected exactly 1/{s} of it and at least {crop // s} px a side."
            )
        # Crop corners on the LQ grid (and the latent grid), so paired crops and latents line up.
        grid = s * self.latent_factor
        top = int(torch.randint(0, (hr.shape[-2] - crop) // grid + 1, (), generator=rng)) * grid
        left = int(torch.randint(0, (hr.shape[-1] - crop) // grid + 1, (), generator=rng)) * grid
        gt = hr[:, top:top + crop, left:left + crop]
        flipped = self.flip and bool(torch.rand((), generator=rng) < 0.5)
        if flipped:
            gt = gt.flip(-1)
        sample = {"gt": gt.contiguous() * 2 - 1}
        if self.latent_files is not None:
            f = self.latent_factor
            latent = load_file(str(self.latent_files[index]))["latent"][:, top // f:(top + crop) // f, left // f:(left + crop) // f]
            sample["gt_latent"] = (latent.flip(-1) if flipped else latent).contiguous()
        if not self.make_lq:
            return sample
        degraded = True
        if lr is None:
            # Drawn whatever clean_prob is, so the degradations of a run do not depend on it.
            degraded = bool(torch.rand((), generator=rng) >= self.clean_prob)
            lq = real_esrgan_degrade(gt, self.degradation, rng) if degraded else clean_downscale(gt, s)
        else:
            lq = lr[:, top // s:(top + crop) // s, left // s:(left + crop) // s]
            lq = lq.flip(-1) if flipped else lq
        return {**sample, "lq": lq.contiguous() * 2 - 1, "degraded": torch.tensor(degraded)}


def clean_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1] -> ``(3, H / scale, W / scale)`` by antialiased bicubic (close to PIL's bicubic
    downscale, the clean benchmark protocol), clamped and rounded to 8-bit steps as a saved LQ image would be."""
    small = F.interpolate(hr[None], scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)[0]
    return (small.clamp(0, 1) * 255).round() / 255


def _latent_files(latent_dir: Path, hr_files: list[Path]) -> tuple[list[Path], int]:
    """Each HR image's latent file (``python -m training.latents``) and the VAE's downsampling factor."""
    files = [latent_dir / f"{f.stem}.safetensors" for f in hr_files]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"data.latent_dir {latent_dir} has no {missing[0]}; run python -m training.latents first.")
    with safe_open(str(files[0]), framework="pt") as handle:
        factor = int((handle.metadata() or {}).get("vae_scale_factor", 0))
    if factor < 1:
        raise ValueError(f"{files[0]} has no vae_scale_factor metadata; it was not written by python -m training.latents.")
    return files, factor


def build_dataloader(dataset: SRPairDataset, position: StreamPosition, num_workers: int) -> DataLoader:
    """An endless loader of ``position.batch_size`` samples for one process, starting at ``position``."""
    return DataLoader(
        dataset,
        batch_size=position.batch_size,
        sampler=StreamSampler(len(dataset), dataset.seed, position),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
