"""Image transforms for CLIP training and evaluation.

Train: RandomResizedCrop (`ResizedCrop`: torchvision's crop distribution, OpenCV's resize) ->
uint8 tensor -> optional horizontal flip -> optional brightness/contrast jitter -> optional
colour mix (`ColorMix`) -> optional RandomErasing (mean colour). Batches leave the dataloader
workers as uint8; the trainer normalises them on its device (`normalize_images`): a quarter of
the bytes through the worker queue (and over PCIe on a GPU), and no float conversion in the
workers, which on a CPU machine share the cores with the model (bench/data_loader.py).
Eval: Resize shorter side (bicubic) -> CenterCrop -> ToTensor -> Normalize.

All random choices come from torch's global generator (torchvision's v1 transforms draw from it),
which is what lets `training.data.decode` make augmentation reproducible by seeding that generator per
sample inside `torch.random.fork_rng`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from training.data.config import AugmentConfig

# The statistics of OpenAI's CLIP training set; every public CLIP checkpoint expects them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The mean colour in 0..255: what RandomErasing paints before normalisation (it becomes ~0).
CLIP_MEAN_UINT8 = tuple(round(255 * m) for m in CLIP_MEAN)
# RandomResizedCrop's aspect-ratio range (torchvision's and OpenCLIP's default).
CROP_RATIO = (3 / 4, 4 / 3)


def crop_box(height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w): RandomResizedCrop's box, drawn exactly as torchvision's `get_params`
    draws it (same algorithm, same generator calls in the same order, float32 where it uses
    float32), at 0.4 of the cost: 0.23 -> 0.09 ms per 256-px image at scale (0.9, 1), one
    core (AMD EPYC). Its ten tries each build small tensors (log of the ratio range, two fresh
    1-element tensors, an exp); with scale (0.9, 1) most tries miss. Here one float32 buffer
    takes the draws. tests/test_data.py checks the boxes equal torchvision's."""
    area = height * width
    log_low, log_high = (math.log(r) for r in ratio)
    # torchvision computes the range as a float32 tensor and draws within it.
    log_low, log_high = float(np.float32(log_low)), float(np.float32(log_high))
    draw = torch.empty(1)
    for _ in range(10):
        target_area = area * draw.uniform_(scale[0], scale[1]).item()
        aspect = draw.uniform_(log_low, log_high).exp_().item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # No try fitted: the whole image, cut to the nearest allowed aspect ratio (centred).
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ResizedCrop:
    """RandomResizedCrop: RGB pixels (uint8 HWC array, or a PIL image) -> uint8 tensor [3, size, size].

    The crop is drawn as torchvision's `RandomResizedCrop.get_params` draws it (`crop_box`: same
    scale and ratio distribution, same torch generator, so seeding per sample still fixes it); the resize is
    OpenCV's, on the crop only. Measured on 256-px JPEGs cropped to 224 (one core, AMD EPYC):
    torchvision's PIL bicubic 1.71 ms per image, OpenCV bicubic 0.64 ms, mean difference 0.28 of
    255 levels. Bicubic has no antialiasing, which is harmless up to a 2x reduction (the JPEG is
    already decoded at a reduced DCT scale, so the crop is rarely more than 2x the output);
    beyond 2x, OpenCV's area filter averages every source pixel instead.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio=CROP_RATIO) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        pixels = np.asarray(image)  # the training loader decodes into numpy (decode_pixels)
        top, left, height, width = crop_box(*pixels.shape[:2], self.scale, self.ratio)
        crop = pixels[top:top + height, left:left + width]
        shrink = max(height, width) > 2 * self.size
        resized = cv2.resize(crop, (self.size, self.size),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        # A [3, H, W] view of the HWC pixels: the copy into the batch (`stack_images`) is then a
        # plain memcpy, instead of a channel transpose here (0.15 ms) and a copy there.
        return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)


# How far the colour mix's offset reaches per unit of `color_mix`, in 0..255 (about one
# standard deviation of CLIP's pixel statistics, ~0.27 x 255).
COLOR_MIX_OFFSET = 64.0


def draw_color_mix(sigma: float) -> torch.Tensor:
    """The colour mix's 12 numbers for one image: a 3x3 matrix I + sigma * N(0, 1) (row-major),
    then an offset sigma * COLOR_MIX_OFFSET * N(0, 1) per channel. One draw from torch's
    generator, which the device path (device_augment) repeats in the worker."""
    noise = torch.randn(12) * sigma
    noise[:9] += torch.eye(3).flatten()
    noise[9:] *= COLOR_MIX_OFFSET
    return noise


def apply_color_mix(pixels: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Float [B, 3, H, W] in 0..255 and mixes [B, 12] -> M (x - mean) + mean + offset, clamped.
    Around the mean colour, so a mix near I leaves an image near itself."""
    mean = torch.tensor(CLIP_MEAN_UINT8, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    matrix = mix[:, :9].reshape(-1, 3, 3).to(pixels.dtype)
    offset = mix[:, 9:].reshape(-1, 3, 1, 1).to(pixels.dtype)
    mixed = torch.einsum("bij,bjhw->bihw", matrix, pixels - mean) + mean + offset
    return mixed.clamp_(0, 255)


class ColorMix:
    """A random affine map of each image's colours (a 3x3 matrix near the identity plus an
    offset): hues, saturation and brightness move a little and together, in all directions.
    Why: on the demo corpus a CNN otherwise learns one detector per colour x shape pair, and
    the held-out pairs (colours it saw only on other shapes) fail; with colours that wander
    around their names, shape features are shared across colours (measured in
    configs/tiny_demo.toml). Keep sigma small where captions name colours (0.1 keeps the
    demo's eight colour names apart; 0.2 already confused some). AlexNet's PCA lighting noise
    is the offset-only special case along the data's principal colours."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mix = draw_color_mix(self.sigma).double()
        matrix = mix[:9].view(3, 3)
        mean = torch.tensor(CLIP_MEAN_UINT8, dtype=torch.float64)
        # M (x - mean) + mean + offset = M x + (mean - M mean + offset): one affine map, which
        # OpenCV applies to uint8 HWC pixels in one pass, rounding and saturating, with no float
        # copy of the crop (40 us per 64-px crop, one thread, draw included). The device path
        # applies the same map in float (`apply_color_mix`); test_device_augment compares them.
        affine = torch.cat([matrix, (mean - matrix @ mean + mix[9:]).view(3, 1)], dim=1)
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # HWC, a view when it is one
        mixed = cv2.transform(pixels, affine.numpy())
        return torch.from_numpy(mixed).permute(2, 0, 1)


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor for a batch. Inside a dataloader worker it is allocated in shared
    memory, as torch's default_collate does: handing the batch to the trainer then sends a file
    descriptor, where a private tensor would first be copied into shared memory (9.6 MB per
    64 x 224-px batch, ~4% of a worker's time; bench/data_loader.py)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.tensor([], dtype=torch.uint8).set_(storage).view(shape)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [3, H, W] images -> a [B, 3, H, W] batch stored channels-last (NHWC), the layout
    the crops come in. `.float()` and the normalisation keep it; convolutions take it as is."""
    height, width = images[0].shape[1:]
    out = batch_buffer((len(images), height, width, 3))
    for index, image in enumerate(images):
        out[index].copy_(image.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)


def build_train_transform(cfg: AugmentConfig) -> T.Compose:
    """RGB pixels (uint8 HWC array or PIL image) -> uint8 tensor [3, cfg.image_size, cfg.image_size] (not yet normalised:
    see `normalize_images`). Everything after the crop works on the uint8 tensor."""
    steps: list = [ResizedCrop(cfg.image_size, cfg.scale)]
    if cfg.hflip > 0:
        # Flips are not free for CLIP: captions saying "left"/"right" become wrong. Off by default.
        steps.append(T.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.color_jitter > 0:
        # Brightness and contrast only: hue/saturation shifts contradict color words in captions.
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter))
    if cfg.color_mix > 0:
        steps.append(ColorMix(cfg.color_mix))
    if cfg.random_erasing > 0:
        # The mean colour, which normalisation turns into ~0 (what erasing after Normalize with
        # value 0 would paint).
        steps.append(T.RandomErasing(p=cfg.random_erasing, value=CLIP_MEAN_UINT8))
    return T.Compose(steps)


def normalize_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] from the train loader -> float32 CLIP-normalised, on `device`. The
    copy moves uint8 (4x fewer bytes); the arithmetic then runs where the model runs."""
    non_blocking = device.type == "cuda"  # the loader pins its batches when CUDA is present
    return normalize_(images.to(device, non_blocking=non_blocking).float())


def normalize_(pixels: torch.Tensor) -> torch.Tensor:
    """Float [B, 3, H, W] in 0..255 -> CLIP-normalised, in place (on the tensor's device)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return pixels.sub_(mean).div_(std)


def build_eval_transform(image_size: int) -> T.Compose:
    """Deterministic: resize the shorter side, then take the center square."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
