"""The ``peaks`` column finder on torch tensors, for CUDA.

Same algorithm as :func:`agent.columns.detect_peaks`: Gaussian smoothing
(separable convolution), 3 x 3 local maxima (max pooling), the floor between
columns from block minima, a noise-scaled threshold, suppression of close
peaks and the shared weighted-centroid refinement. Only the few candidate
positions travel to the CPU for the suppression step. Tested on CPU torch
against the numpy path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from agent.columns import (
    _MAD_TO_SIGMA,
    _NOISE_KERNEL,
    _NOISE_KERNEL_GAIN,
    _SMOOTHING_TRUNCATE,
    ColumnFinderConfig,
    PeakFit,
    PeakScales,
    refine_peaks,
    suppress_close_peaks,
)


def _gaussian_smooth(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter with edge replication, like ``ndimage.gaussian_filter(mode='nearest')``."""
    radius = int(_SMOOTHING_TRUNCATE * sigma + 0.5)  # scipy's radius for the numpy path's truncate
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    batch = image[None, None]
    batch = F.conv2d(F.pad(batch, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    batch = F.conv2d(F.pad(batch, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return batch[0, 0]


def _noise_sigma(image: torch.Tensor) -> float:
    """Immerkær noise estimate on a central crop (see :func:`agent.columns.noise_sigma`)."""
    rows, cols = image.shape
    r0, c0 = max((rows - 1024) // 2, 0), max((cols - 1024) // 2, 0)
    crop = image[r0 : r0 + 1024, c0 : c0 + 1024][None, None]
    kernel = torch.as_tensor(_NOISE_KERNEL, dtype=torch.float32, device=image.device).view(1, 1, 3, 3)
    # Every second response in each direction, as the numpy path does.
    response = F.conv2d(crop, kernel)[0, 0, ::2, ::2].flatten()
    deviation = (response - response.median()).abs().median()
    return float(_MAD_TO_SIGMA * deviation / _NOISE_KERNEL_GAIN)


def _floor_at(smoothed: torch.Tensor, block: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Minimum over 3 x 3 blocks of ``block`` pixels, interpolated bilinearly at the peaks."""
    height, width = smoothed.shape
    pad_rows, pad_cols = (-height) % block, (-width) % block
    padded = F.pad(smoothed[None, None], (0, pad_cols, 0, pad_rows), mode="replicate")
    block_min = -F.max_pool2d(-padded, block, block)
    grid = -F.max_pool2d(-F.pad(block_min, (1, 1, 1, 1), mode="replicate"), 3, 1)
    grid = grid[0, 0]
    grid_row = ((rows.float() + 0.5) / block - 0.5).clamp(0, grid.shape[0] - 1)
    grid_col = ((cols.float() + 0.5) / block - 0.5).clamp(0, grid.shape[1] - 1)
    r0, c0 = grid_row.floor().long(), grid_col.floor().long()
    r1, c1 = (r0 + 1).clamp(max=grid.shape[0] - 1), (c0 + 1).clamp(max=grid.shape[1] - 1)
    fr, fc = grid_row - r0, grid_col - c0
    top = grid[r0, c0] * (1 - fc) + grid[r0, c1] * fc
    bottom = grid[r1, c0] * (1 - fc) + grid[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def detect_peaks_torch(
    image: np.ndarray | torch.Tensor,
    spacing_px: float,
    config: ColumnFinderConfig | None = None,
    device: str | torch.device = "cuda",
) -> PeakFit:
    """Find and refine columns with torch on ``device`` (the CUDA path of the ``peaks`` method).

    Parameters
    ----------
    image : numpy.ndarray or torch.Tensor
        2-D image without NaN.
    spacing_px : float
        A-A lattice spacing, pixels.
    config : ColumnFinderConfig, optional
        Threshold, scales and iterations.
    device : str or torch.device
        Where to compute (``"cuda"``; ``"cpu"`` works too and is what the tests use).

    Returns
    -------
    PeakFit
        One entry per column, pixel units, as numpy arrays.
    """
    config = config or ColumnFinderConfig()
    scales = PeakScales.from_spacing(spacing_px, config)
    tensor = torch.as_tensor(image, dtype=torch.float32).to(device)
    # TF32 convolutions (the cuDNN default on recent GPUs) round to 10 mantissa bits: keep full float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        smoothed = _gaussian_smooth(tensor, scales.sigma_px)
    is_max = smoothed >= F.max_pool2d(F.pad(smoothed[None, None], (1, 1, 1, 1), mode="replicate"), 3, 1)[0, 0]
    border = scales.border_px
    is_max[:border] = False
    is_max[-border:] = False
    is_max[:, :border] = False
    is_max[:, -border:] = False
    rows, cols = torch.nonzero(is_max, as_tuple=True)
    floor = _floor_at(smoothed, scales.floor_block, rows, cols)
    contrast = smoothed[rows, cols] - floor
    threshold = config.threshold_sigma * _noise_sigma(tensor) / (2 * math.sqrt(math.pi) * scales.sigma_px)
    strong = contrast > threshold
    rows, cols, floor, contrast = rows[strong], cols[strong], floor[strong], contrast[strong]
    keep = suppress_close_peaks(
        rows.cpu().numpy(), cols.cpu().numpy(), contrast.cpu().numpy(), scales.separation_px
    )
    keep_tensor = torch.as_tensor(keep, device=tensor.device)
    return refine_peaks(
        tensor, floor[keep_tensor], rows[keep_tensor], cols[keep_tensor], scales, config.refine_iterations
    )
