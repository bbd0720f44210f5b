"""Augmentation split in two (`data.augment_on=device`): the workers decode, draw and crop; the
model's device resizes, flips, jitters, colour-mixes, erases and normalises the whole batch at once.

Why: on a GPU node the CPU cores are the loader's budget. A bicubic resize costs a worker more
than the JPEG decode (bench/profiles/SUMMARY.md), while on the GPU the batch's resize is one
kernel. So a worker does only what needs the sample: decode (at the smallest DCT scale the crop
allows), draw the random parameters, and slice out the crop (a view, no arithmetic).

Same semantics as the worker path (`training.data.transforms.build_train_transform`): the random
draws are made by the same torchvision functions, in the same order, from the same per-sample
seeded generator, so a sample gets the same crop box, flip, jitter factors, colour mix and erased rectangle
either way. Only the interpolation differs: the device path resizes with `roi_align`, which
averages ceil(crop / output) bilinear samples per output pixel in each direction (an area-like
antialiased filter when shrinking, bilinear when enlarging), where the worker path uses OpenCV's
bicubic. tests/test_device_augment.py bounds the difference.

Device-agnostic: the same code runs on the CPU (that is how it is tested); the trainer asks for a
GPU only because on a CPU machine it would move the work to the cores the workers share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

from training.data.config import AugmentConfig
from training.data.transforms import (
    CLIP_MEAN_UINT8, CROP_RATIO, apply_color_mix, batch_buffer, crop_box, draw_color_mix, normalize_,
)

# Per-sample parameters shipped with the crops, one float row each.
H, W, FLIP, BRIGHTNESS, CONTRAST, BRIGHTNESS_FIRST, ERASE_TOP, ERASE_LEFT, ERASE_H, ERASE_W = range(10)
MIX = slice(10, 22)  # the colour mix (transforms.draw_color_mix), all zero when it is off
PARAMS = 22


@dataclass
class DrawnCrop:
    """A crop of the decoded image (uint8 HWC, not yet resized) and its drawn parameters."""

    pixels: np.ndarray
    params: list[float]


class DrawCrop:
    """The worker half: RGB pixels (uint8 HWC array or PIL image) -> DrawnCrop. Draws exactly what the worker path draws:
    RandomResizedCrop's box (`crop_box`), then the flip coin, then ColorJitter's order and factors, then
    the colour mix, then RandomErasing's coin and rectangle (each only when that augmentation is on)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.jitter = (T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter)
                       if cfg.color_jitter > 0 else None)
        self.erasing = (T.RandomErasing(p=cfg.random_erasing, value=CLIP_MEAN_UINT8)
                        if cfg.random_erasing > 0 else None)
        # RandomErasing.get_params reads only the shape of the (resized) image.
        self._output_shape = torch.empty(3, cfg.image_size, cfg.image_size, dtype=torch.uint8)

    def __call__(self, image: np.ndarray | Image.Image) -> DrawnCrop:
        cfg = self.cfg
        pixels = np.asarray(image)
        top, left, height, width = crop_box(*pixels.shape[:2], cfg.scale, CROP_RATIO)
        params = [0.0] * PARAMS
        params[H], params[W] = height, width
        params[BRIGHTNESS] = params[CONTRAST] = 1.0
        if cfg.hflip > 0:
            params[FLIP] = float(torch.rand(1).item() < cfg.hflip)
        if self.jitter is not None:
            order, brightness, contrast, _, _ = T.ColorJitter.get_params(
                self.jitter.brightness, self.jitter.contrast, None, None)
            order = order.tolist()
            params[BRIGHTNESS], params[CONTRAST] = brightness, contrast
            params[BRIGHTNESS_FIRST] = float(order.index(0) < order.index(1))
        if cfg.color_mix > 0:
            params[MIX] = draw_color_mix(cfg.color_mix).tolist()
        if self.erasing is not None and torch.rand(1).item() < self.erasing.p:
            i, j, h, w, _ = T.RandomErasing.get_params(
                self._output_shape, self.erasing.scale, self.erasing.ratio,
                list(self.erasing.value))
            params[ERASE_TOP:ERASE_W + 1] = [i, j, h, w]
        return DrawnCrop(pixels[top:top + height, left:left + width], params)


def collate_crops(crops: list[DrawnCrop]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 [B, 3, Hmax, Wmax], float params [B, PARAMS]). A crop smaller than the largest
    is padded by repeating its last row and column: the resize's bilinear taps at the crop's
    far edge then read the edge pixel, as if the crop ended there (border clamping)."""
    height = max(c.pixels.shape[0] for c in crops)
    width = max(c.pixels.shape[1] for c in crops)
    out = batch_buffer((len(crops), height, width, 3))
    view = out.numpy()
    for index, crop in enumerate(crops):
        h, w = crop.pixels.shape[:2]
        view[index, :h, :w] = crop.pixels
        if w < width:
            view[index, :h, w:] = view[index, :h, w - 1:w]
        if h < height:
            view[index, h:] = view[index, h - 1:h]
    params = torch.tensor([c.params for c in crops], dtype=torch.float32)
    return out.permute(0, 3, 1, 2), params


def _grey_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean of the ITU-R 601 luma (what torchvision's adjust_contrast blends to)."""
    grey = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return grey.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def augment_on_device(images: torch.Tensor, params: torch.Tensor, size: int,
                      device: torch.device) -> torch.Tensor:
    """uint8 crops [B, 3, Hmax, Wmax] + params [B, PARAMS] -> float32 CLIP-normalised
    [B, 3, size, size] on `device`: resize, flip, jitter, erase, normalise, batched."""
    # Which steps apply is read from the host copy of the params: no device sync per step.
    flips = bool(params[:, FLIP].any())
    jitters = bool((params[:, BRIGHTNESS] != 1).any() or (params[:, CONTRAST] != 1).any())
    erases = bool((params[:, ERASE_H] > 0).any())
    mixes = bool(params[:, MIX].any())
    non_blocking = device.type == "cuda"
    x = images.to(device, non_blocking=non_blocking).float()
    p = params.to(device, non_blocking=non_blocking)
    batch = x.shape[0]
    zeros = torch.zeros(batch, device=device)
    # aligned=True: box (0, 0, w, h) covers the crop's pixels exactly (half-pixel centres, as
    # OpenCV's resize maps them); sampling_ratio=-1: ceil(crop side / size) taps per bin.
    boxes = torch.stack([torch.arange(batch, device=device, dtype=x.dtype), zeros, zeros,
                         p[:, W], p[:, H]], dim=1)
    x = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flips:
        x = torch.where(p[:, FLIP].view(-1, 1, 1, 1) > 0, x.flip(-1), x)
    if jitters:
        b = p[:, BRIGHTNESS].view(-1, 1, 1, 1)
        c = p[:, CONTRAST].view(-1, 1, 1, 1)

        def brightness(y: torch.Tensor) -> torch.Tensor:
            return (y * b).clamp(0, 255)

        def contrast(y: torch.Tensor) -> torch.Tensor:
            return (c * y + (1 - c) * _grey_mean(y)).clamp(0, 255)

        first = p[:, BRIGHTNESS_FIRST].view(-1, 1, 1, 1) > 0
        x = torch.where(first, contrast(brightness(x)), brightness(contrast(x)))
    if mixes:
        x = apply_color_mix(x, p[:, MIX])
    if erases:
        rows = torch.arange(size, device=device).view(1, size, 1)
        cols = torch.arange(size, device=device).view(1, 1, size)
        top, left = p[:, ERASE_TOP].view(-1, 1, 1), p[:, ERASE_LEFT].view(-1, 1, 1)
        inside = ((rows >= top) & (rows < top + p[:, ERASE_H].view(-1, 1, 1))
                  & (cols >= left) & (cols < left + p[:, ERASE_W].view(-1, 1, 1)))
        fill = torch.tensor(CLIP_MEAN_UINT8, device=device, dtype=x.dtype).view(1, 3, 1, 1)
        x = torch.where(inside.unsqueeze(1), fill, x)
    return normalize_(x)
