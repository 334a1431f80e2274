"""Per-image random operations of the `inception`, `augreg` and `deit` recipes, in torch
alone: the fallback where torchvision does not import (this repository's CPU venv).

Each `draw_*` function draws from the current torch generator in the order torchvision's
transforms v2 draw (`RandomResizedCrop`, `RandomHorizontalFlip`, `RandAugment`), so under the
same seeded generator (megavit/data/mixing.py `seeded_torch_rng`) both paths choose the same
crop box, flip and operations; the `apply_*` functions carry them out on one image
[c, h, w]. Images here are uint8, as in torchvision's recommended pipeline (decode, augment
in uint8, then convert): RandAugment's operations compute on their 0..255 values as float.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F

CROP_SCALE = (0.08, 1.0)          # area share of the random-resized crop (Inception)
CROP_RATIO = (3 / 4, 4 / 3)       # aspect ratio range


def draw_resized_crop(height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): up to 10 tries of an area share ~ U(scale) and
    a log-uniform aspect ratio, then a centre crop clamped to `ratio`."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(lo, hi).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _native_uint8_resize() -> bool:
    """Whether torch resizes uint8 images itself here (bilinear, on CPUs with AVX2 /
    AVX-512 or ARM), as torchvision then does; elsewhere both resize in float and round."""
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


def apply_resized_crop(image: torch.Tensor, box: tuple[int, int, int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """image [c, h, w] uint8 -> its box resized to `size` (bilinear, antialiased when
    shrinking), as torchvision resizes uint8 tensors."""
    top, left, h, w = box
    crop = image[:, top:top + h, left:left + w]
    if (h, w) == tuple(size):
        return crop.clone()
    x = crop.unsqueeze(0)
    if not _native_uint8_resize():
        x = x.float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return x if x.dtype == torch.uint8 else x.round_().to(torch.uint8)


def draw_flip(p: float) -> bool:
    """torchvision's RandomHorizontalFlip draw: flip when U(0, 1) < p."""
    return bool(torch.rand(1) < p)


# ---------------------------------------------------------------------------------------
# RandAugment: torchvision's operation space (14 operations, 31 magnitude bins)
# ---------------------------------------------------------------------------------------

MAGNITUDE_BINS = 31
# name -> (the largest magnitude (None: no magnitude), signed); translations scale with size
OPERATIONS: dict[str, tuple[float | None, bool]] = {
    "Identity": (None, False), "ShearX": (0.3, True), "ShearY": (0.3, True),
    "TranslateX": (150.0 / 331.0, True), "TranslateY": (150.0 / 331.0, True),
    "Rotate": (30.0, True), "Brightness": (0.9, True), "Color": (0.9, True),
    "Contrast": (0.9, True), "Sharpness": (0.9, True), "Posterize": (4.0, False),
    "Solarize": (1.0, False), "AutoContrast": (None, False), "Equalize": (None, False),
}


def rand_augment_magnitude(timm_m: float) -> int:
    """timm's `rand-mM` (M of 10) as a bin of 31 (0..30): 9 -> 27."""
    return int(round(timm_m * (MAGNITUDE_BINS - 1) / 10))


def draw_rand_augment(num_ops: int, magnitude_bin: int, height: int, width: int
                      ) -> list[tuple[str, float]]:
    """`num_ops` (operation, signed magnitude) pairs: each operation uniform over
    OPERATIONS, its magnitude the bin's value, negated with probability 1/2 if signed."""
    names = list(OPERATIONS)
    out = []
    for _ in range(num_ops):
        name = names[int(torch.randint(len(names), ()))]
        top, signed = OPERATIONS[name]
        if top is None:
            out.append((name, 0.0))
            continue
        frac = magnitude_bin / (MAGNITUDE_BINS - 1)
        if name == "Posterize":      # 8 bits at bin 0 down to 4 at the last bin
            value = float(round(8 - frac * 4))
        elif name == "Solarize":     # threshold from 1 down to 0
            value = float(torch.linspace(1.0, 0.0, MAGNITUDE_BINS)[magnitude_bin])
        else:
            span = top * (width if name == "TranslateX" else height if name == "TranslateY"
                          else 1.0)
            value = float(torch.linspace(0.0, span, MAGNITUDE_BINS)[magnitude_bin])
        if signed and torch.rand(()) <= 0.5:
            value = -value
        out.append((name, value))
    return out


def _grey(image: torch.Tensor) -> torch.Tensor:
    """[c, h, w] -> [1, h, w] luma (ITU-R 601-2, as PIL and torchvision)."""
    if image.shape[0] == 1:
        return image
    r, g, b = image[0], image[1], image[2]
    return r.mul(0.2989).add(g, alpha=0.587).add(b, alpha=0.114).unsqueeze(0)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    """factor a + (1 - factor) b on 0..255 values, clamped and truncated as uint8 is."""
    return a.mul(factor).add(b, alpha=1.0 - factor).clamp(0, 255).floor()


def _inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                    shear: tuple[float, float]) -> list[float]:
    """The 2x3 matrix taking an output pixel (centred coordinates) to the input pixel it
    reads, for a rotation by `angle` degrees and shears (degrees) about `center`, then a
    translation: C RSS^-1 C^-1 T^-1, computed in float64 in the order torchvision does."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m = [d, -b, 0.0, -c, a, 0.0]
    cx, cy = center
    px, py = cx + translate[0], cy + translate[1]
    m[2] += cx - m[0] * px - m[1] * py
    m[5] += cy - m[3] * px - m[4] * py
    return m


def _affine(image: torch.Tensor, matrix: list[float]) -> torch.Tensor:
    """image [c, h, w] sampled through `matrix` (`_inverse_affine`): nearest neighbour, 0
    outside. The grid is the pixel centres (x - (w - 1) / 2, y - (h - 1) / 2) times the
    matrix, normalised by half the size, as torchvision builds it (there with a batched
    matmul over [x, y, 1]; here the same products and sums element-wise, which give the
    same floats, checked against torchvision in tests/test_augment.py, at a fifth of the
    cost)."""
    c, h, w = image.shape
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(2, 3)
    scaled = theta.t().div_(torch.tensor([0.5 * w, 0.5 * h]))      # [3, 2]
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h).unsqueeze(-1)
    gx = xs * scaled[0, 0] + ys * scaled[1, 0] + scaled[2, 0]
    gy = xs * scaled[0, 1] + ys * scaled[1, 1] + scaled[2, 1]
    grid = torch.stack([gx, gy], -1).unsqueeze(0)
    return F.grid_sample(image.unsqueeze(0), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0]


def _geometric(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """Shear (about the top-left corner; `value` is the shear factor), translation (whole
    pixels) or rotation (`value` degrees, counter-clockwise about the centre) of image
    [c, h, w]."""
    c, h, w = image.shape
    corner = (-w * 0.5, -h * 0.5)
    if name == "ShearX":
        m = _inverse_affine(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(value)), 0.0))
    elif name == "ShearY":
        m = _inverse_affine(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(value))))
    elif name == "TranslateX":
        m = _inverse_affine((0.0, 0.0), 0.0, (float(int(value)), 0.0), (0.0, 0.0))
    elif name == "TranslateY":
        m = _inverse_affine((0.0, 0.0), 0.0, (0.0, float(int(value))), (0.0, 0.0))
    else:
        angle = value % 360
        if angle == 0:
            return image.clone()
        if angle == 180:
            return torch.rot90(image, k=2, dims=(-2, -1))
        if h == w and angle in (90, 270):
            return torch.rot90(image, k=1 if angle == 90 else 3, dims=(-2, -1))
        m = _inverse_affine((0.0, 0.0), -angle, (0.0, 0.0), (0.0, 0.0))
    return _affine(image, m)


def _equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of 0..255 values (PIL's rule: the last
    non-empty bin is left out of the step, levels spread by the cumulative count)."""
    out = []
    for channel in image:
        values = channel.long().flatten()
        hist = torch.bincount(values, minlength=256)
        nonzero = hist[hist > 0]
        step = torch.div(nonzero[:-1].sum(), 255, rounding_mode="floor") if len(nonzero) else 0
        if step == 0:
            out.append(channel)
            continue
        lut = torch.div(torch.cumsum(hist, 0) + torch.div(step, 2, rounding_mode="floor"), step,
                        rounding_mode="floor")
        lut = torch.cat([torch.zeros(1, dtype=lut.dtype), lut[:-1]]).clamp(0, 255)
        out.append(lut[values].reshape(channel.shape).float())
    return torch.stack(out)


def _sharpen(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a 3x3 smoothing ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) of the
    interior; the border pixels stay."""
    c, h, w = image.shape
    if h <= 2 or w <= 2:
        return image
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]]).expand(c, 1, 3, 3)
    smooth = F.conv2d(image.unsqueeze(0), kernel, groups=c)[0].round()
    out = image.clone()
    inner = out[:, 1:-1, 1:-1]
    inner.add_(smooth - inner, alpha=1.0 - factor)    # x + (1 - f)(smooth - x)
    return out.clamp(0, 255).floor()


def apply_rand_augment(image: torch.Tensor, ops: list[tuple[str, float]]) -> torch.Tensor:
    """image [c, h, w] with values 0..255 (float) -> the operations applied in turn."""
    for name, value in ops:
        if name == "Identity":
            continue
        if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            image = _geometric(image, name, value)
        elif name == "Brightness":
            image = _blend(image, torch.zeros_like(image), 1.0 + value)
        elif name == "Color":
            if image.shape[0] == 3:
                image = _blend(image, _grey(image).floor().expand_as(image), 1.0 + value)
        elif name == "Contrast":
            mean = _grey(image).floor().mean()
            image = _blend(image, mean.expand_as(image), 1.0 + value)
        elif name == "Sharpness":
            image = _sharpen(image, 1.0 + value)
        elif name == "Posterize":
            keep = 256 - (1 << (8 - int(value)))
            image = (image.long() & keep).float()
        elif name == "Solarize":
            image = torch.where(image >= 255.0 * value, 255.0 - image, image)
        elif name == "AutoContrast":
            lo = image.amin(dim=(1, 2), keepdim=True)
            hi = image.amax(dim=(1, 2), keepdim=True)
            flat = hi == lo
            spread = torch.where(flat, torch.ones_like(hi), (hi - lo) * (1.0 / 255.0))
            image = ((image - torch.where(flat, torch.zeros_like(lo), lo)) / spread
                     ).clamp(0, 255).floor()
        elif name == "Equalize":
            image = _equalize(image)
    return image
