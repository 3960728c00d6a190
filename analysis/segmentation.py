"""GMM versus VAE segmentation of column-centred patches (the research write-up's comparison).

Every atomic column gets a small patch of the image around it, resampled to a fixed
grid whose size follows the lattice spacing, so the same model works at any pixel
size. Both segmentations see exactly these patches:

* GMM: a Gaussian mixture on the leading principal components of the patches;
* VAE: a small fully connected variational autoencoder learns a 2-D latent space
  of the patches (bounded training on a sample, quick on a CPU); a Gaussian mixture
  with the same number of classes then segments that latent space.

Classes are numbered by the mean brightness of their patch centres (class 0 the
brightest), so the two segmentations name comparable classes alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

PATCH_SIDE = 16
"""Samples along each edge of a patch."""

_MAD_TO_SIGMA = 1.4826


def column_patches(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, spacing_px: float, half_extent: float = 0.75
) -> np.ndarray:
    """Patches of the image centred on columns, resampled to :data:`PATCH_SIDE` squared samples.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.
    rows, cols : numpy.ndarray
        Sub-pixel column positions, pixels.
    spacing_px : float
        A-A lattice spacing, pixels.
    half_extent : float
        Half the patch edge over the spacing (0.75 reaches the four nearest other-species columns).

    Returns
    -------
    numpy.ndarray
        float32 ``(N, PATCH_SIDE * PATCH_SIDE)``, standardised by the image's robust level and
        spread (not per patch: brightness tells A from B columns).
    """
    offsets = np.linspace(-half_extent * spacing_px, half_extent * spacing_px, PATCH_SIDE, dtype=np.float32)
    d_row, d_col = np.meshgrid(offsets, offsets, indexing="ij")
    patches = np.empty((rows.size, PATCH_SIDE * PATCH_SIDE), dtype=np.float32)
    # In chunks, so that the coordinate arrays of a whole 4k image never exist at once.
    for start in range(0, rows.size, 20000):
        r = rows[start : start + 20000, None].astype(np.float32) + d_row.ravel()[None, :]
        c = cols[start : start + 20000, None].astype(np.float32) + d_col.ravel()[None, :]
        patches[start : start + r.shape[0]] = ndimage.map_coordinates(
            image, np.stack([r, c]), order=1, mode="nearest"
        )
    level = float(np.median(patches)) if patches.size else 0.0
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(patches - level))) if patches.size else 1.0
    patches -= level
    patches /= spread if spread > 0 else 1.0
    return patches


class PatchVAE(nn.Module):
    """A small fully connected VAE of flattened patches.

    Parameters
    ----------
    inputs : int
        Samples per patch.
    latent : int
        Width of the latent space.
    hidden : int
        Width of the hidden layers.
    """

    def __init__(self, inputs: int, latent: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden // 2), nn.SiLU()
        )
        self.mean = nn.Linear(hidden // 2, latent)
        self.log_variance = nn.Linear(hidden // 2, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden // 2),
            nn.SiLU(),
            nn.Linear(hidden // 2, hidden),
            nn.SiLU(),
            nn.Linear(hidden, inputs),
        )

    def encode(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and log-variance of each patch."""
        hidden = self.encoder(patches)
        return self.mean(hidden), self.log_variance(hidden)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction (from a reparameterised sample), latent mean and log-variance."""
        mean, log_variance = self.encode(patches)
        sample = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        return self.decoder(sample), mean, log_variance


@dataclass(frozen=True)
class Segmentation:
    """GMM and VAE segmentations of the same column patches.

    Parameters
    ----------
    gmm_class, vae_class : numpy.ndarray
        Class per column (0 = brightest patch centres), int64.
    vae_latent : numpy.ndarray
        ``(N, 2)`` VAE latent means.
    pca_features : numpy.ndarray
        ``(N, k)`` principal components the GMM saw.
    vae_loss : list of float
        Training loss per step (reconstruction MSE plus KL divergence per sample).
    classes : int
        Number of classes of each mixture.
    """

    gmm_class: np.ndarray
    vae_class: np.ndarray
    vae_latent: np.ndarray
    pca_features: np.ndarray
    vae_loss: list[float]
    classes: int


def _order_by_brightness(labels: np.ndarray, centre: np.ndarray, classes: int) -> np.ndarray:
    """Renumber classes so that class 0 has the brightest mean patch centre."""
    means = np.array([centre[labels == k].mean() if np.any(labels == k) else -np.inf for k in range(classes)])
    rank = np.empty(classes, dtype=np.int64)
    rank[np.argsort(-means, kind="stable")] = np.arange(classes)
    return rank[labels]


def segment_patches(
    patches: np.ndarray,
    classes: int = 3,
    *,
    pca_components: int = 8,
    vae_steps: int = 600,
    sample: int = 20000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Segmentation:
    """Segment column patches with a GMM on PCA features and with a GMM in a VAE's latent space.

    Parameters
    ----------
    patches : numpy.ndarray
        ``(N, S)`` patches from :func:`column_patches`.
    classes : int
        Mixture components of both segmentations.
    pca_components : int
        Principal components the GMM sees.
    vae_steps : int
        Gradient steps of the VAE (batches of 256 patches): training time is bounded by this,
        not by the image size.
    sample : int
        Patches the PCA, the mixtures and the VAE are fitted on (all patches are then labelled).
    seed : int
        Seeds the sample, the mixtures and the VAE.
    device : str or torch.device
        Where the VAE trains.
    progress : callable, optional
        Called with the VAE step number after each step.

    Returns
    -------
    Segmentation
        Both labellings, the VAE latent means and the training loss.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    count = patches.shape[0]
    if count < max(classes, 4):
        raise ValueError(f"need at least {max(classes, 4)} columns to segment, got {count}")
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.permutation(count)[: min(sample, count)])
    centre = patches[:, patches.shape[1] // 2 + PATCH_SIDE // 2]

    components = min(pca_components, patches.shape[1], len(fit_rows))
    pca = PCA(n_components=components, svd_solver="randomized", random_state=seed).fit(patches[fit_rows])
    features = pca.transform(patches).astype(np.float32)
    gmm = GaussianMixture(n_components=classes, random_state=seed).fit(features[fit_rows])
    gmm_class = _order_by_brightness(gmm.predict(features), centre, classes)

    torch.manual_seed(seed)
    model = PatchVAE(patches.shape[1]).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    training = torch.from_numpy(patches[fit_rows]).to(device)
    losses: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(vae_steps):
        batch = training[
            torch.randint(training.shape[0], (min(256, training.shape[0]),), generator=generator)
        ]
        reconstruction, mean, log_variance = model(batch)
        reconstruction_loss = ((reconstruction - batch) ** 2).sum(dim=1).mean()
        kl = -0.5 * (1 + log_variance - mean**2 - log_variance.exp()).sum(dim=1).mean()
        loss = reconstruction_loss + kl
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1)
    model.eval()
    with torch.no_grad():
        latent = np.concatenate(
            [
                model.encode(torch.from_numpy(patches[start : start + 50000]).to(device))[0].cpu().numpy()
                for start in range(0, count, 50000)
            ]
        )
    latent_gmm = GaussianMixture(n_components=classes, random_state=seed).fit(latent[fit_rows])
    vae_class = _order_by_brightness(latent_gmm.predict(latent), centre, classes)
    return Segmentation(
        gmm_class=gmm_class,
        vae_class=vae_class,
        vae_latent=latent,
        pca_features=features,
        vae_loss=losses,
        classes=classes,
    )
