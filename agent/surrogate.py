"""Pyro Gaussian-process surrogate of region interest over the stage.

:class:`GPSurrogate` learns, from the interest scores of the regions imaged so far, a
posterior mean and uncertainty of interest at every candidate region. It is a
``pyro.contrib.gp`` model:

* inputs are stage positions normalised by the stage extent, optionally followed by
  features of the survey image around each region (an additive kernel: a Matérn-5/2
  or RBF kernel over position plus an ARD RBF kernel over the features, the simplest
  form of the "deep kernel" idea used in autonomous microscopy);
* outputs are standardised by the mean and spread of the observed values;
* an exact :class:`~pyro.contrib.gp.models.GPRegression` while there are at most
  ``exact_max_points`` observations, a :class:`~pyro.contrib.gp.models.SparseGPRegression`
  (variational free energy, inducing points chosen by farthest-point sampling) beyond;
* hyper-parameters (lengthscales, variances, noise) are refitted after each update with a
  bounded number of Adam steps on the exact marginal likelihood, warm-started from the
  previous fit, on a seeded random subset of at most ``fit_max_points`` observations (a
  step costs the cube of the points); the model in use (exact or sparse) then conditions
  on all observations with these hyper-parameters.

Every Pyro call of a surrogate runs inside its own parameter-store scope, so several
surrogates (two policies compared in one process, tests) never share hyper-parameters
through Pyro's global parameter store.

Units: positions in stage nm; values, means and variances in the units of the scores
(variances in score units squared).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Self

import numpy as np
import pyro
import pyro.contrib.gp as gp
import torch
from pydantic import Field, model_validator
from pyro.infer import Trace_ELBO
from pyro.nn.module import PyroParam
from torch.distributions import constraints

from agent.config import StrictModel
from agent.errors import MicrographyError

_DTYPE = torch.float64
"""Kernel matrices are factorised in double precision: small noise makes them ill-conditioned."""

_DEFAULT_STAGE_SCALE_NM = 1000.0
"""Position scale used when no stage limits are given (1 µm)."""

_FEATURE_VARIANCE_SHARE = 0.3
"""Initial share of the prior variance given to the survey-feature kernel."""


class SurrogateError(MicrographyError, ValueError):
    """Observations or query points given to the surrogate are malformed (shape, NaN, features)."""


class SurrogateConfig(StrictModel):
    """Gaussian-process surrogate of region interest.

    Lengths are in stage nanometres; variances are relative to the spread of the observed
    scores (outputs are standardised), so 1.0 means "as large as the observed spread".
    """

    kernel: Literal["matern52", "rbf"] = Field("matern52", description="kernel over stage position")
    lengthscale_nm: float = Field(20.0, gt=0, description="initial lengthscale over position, nm")
    lengthscale_bounds_nm: tuple[float, float] = Field(
        (1.0, 5000.0), description="(min, max) the fitted position lengthscale may take, nm"
    )
    lengthscale_prior_sigma: float | None = Field(
        None,
        gt=0,
        description=(
            "width of a log-normal prior on the position lengthscale around lengthscale_nm (natural-log "
            "units; 0.5 keeps it within a factor 2.7 at one sigma); None fits it by maximum likelihood"
        ),
    )
    feature_lengthscale: float = Field(
        1.0, gt=0, description="initial lengthscale over standardised survey features"
    )
    exact_max_points: int = Field(300, ge=8, description="exact GP up to this many observations")
    inducing_points: int = Field(64, ge=4, description="inducing points of the sparse GP beyond")
    fit_max_points: int = Field(
        128, ge=8, description="observations (seeded random subset) the exact GP fits hyper-parameters on"
    )
    fit_min_points: int = Field(4, ge=2, description="hyper-parameters stay at their initial values below")
    fit_steps_initial: int = Field(100, ge=0, description="Adam steps of the first fit")
    fit_steps_update: int = Field(15, ge=0, description="Adam steps of each later refit (warm-started)")
    learning_rate: float = Field(0.05, gt=0, description="Adam learning rate")
    use_survey_features: bool = Field(False, description="additive kernel over survey features")
    feature_kernel: Literal["rbf", "linear"] = Field(
        "rbf",
        description=(
            "kernel over the features: an ARD RBF, or one linear term per feature (Bayesian linear "
            "regression: interest = sum of weight x feature, each weight with a Gaussian prior whose "
            "variance is fitted)"
        ),
    )
    noise_init: float = Field(0.1, gt=0, description="initial noise variance, standardised units")
    noise_bounds: tuple[float, float] = Field(
        (1e-4, 2.0), description="(min, max) fitted noise variance, standardised units"
    )
    jitter: float = Field(1e-6, gt=0, description="added to kernel diagonals for stable factorisation")
    torch_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads while the surrogate works; None: leave torch's setting"
    )
    seed: int = Field(0, description="seeds the fitting subset")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        low, high = self.lengthscale_bounds_nm
        if not 0 < low < high:
            raise ValueError(
                f"lengthscale_bounds_nm must be (min, max) with 0 < min < max, got {(low, high)}"
            )
        if not low <= self.lengthscale_nm <= high:
            raise ValueError(
                f"lengthscale_nm {self.lengthscale_nm} lies outside lengthscale_bounds_nm {(low, high)}"
            )
        low, high = self.noise_bounds
        if not 0 < low < high:
            raise ValueError(f"noise_bounds must be (min, max) with 0 < min < max, got {(low, high)}")
        if not low <= self.noise_init <= high:
            raise ValueError(f"noise_init {self.noise_init} lies outside noise_bounds {(low, high)}")
        if self.inducing_points > self.exact_max_points:
            raise ValueError(
                f"inducing_points ({self.inducing_points}) must not exceed exact_max_points "
                f"({self.exact_max_points}): the sparse GP would be larger than the exact one"
            )
        return self


def _farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` well-spread rows of ``points`` (greedy farthest-point sampling).

    Deterministic (starts from the row nearest the centroid) and O(n * count), cheap enough
    to re-place inducing points at every update.
    """
    n = points.shape[0]
    if count >= n:
        return np.arange(n)
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = int(np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1)))
    distance = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    for k in range(1, count):
        chosen[k] = int(np.argmax(distance))
        distance = np.minimum(distance, ((points - points[chosen[k]]) ** 2).sum(axis=1))
    return np.sort(chosen)


class GPSurrogate:
    """Gaussian-process model of region interest over stage position (and survey features).

    Parameters
    ----------
    config : SurrogateConfig or None
        Model and fitting settings; None for the defaults.
    feature_dim : int
        Number of survey features per position (columns of ``features``); used only when
        ``config.use_survey_features`` is true, and then must be positive.
    stage_x_nm, stage_y_nm : tuple of float or None
        Stage range ``(min, max)`` in nanometres; positions are normalised by the larger
        extent so lengthscales mean the same on any stage. None: origin 0 and a 1 µm scale.
    feature_variances : sequence of float or None
        Linear feature kernel only: the initial prior variance of each feature's weight, in
        standardised units (the physical prior; fitted from there); None: 1 each.
    feature_weight_means : sequence of float or None
        Linear feature kernel only: the prior mean of each weight, standardised units (what is
        believed before any tile: interest rises with the survey's fringe distortion); the
        model's prior mean is then ``sum(weight_mean * feature)``. None: zero.

    Examples
    --------
    >>> import numpy as np
    >>> surrogate = GPSurrogate(SurrogateConfig(fit_steps_initial=20), stage_x_nm=(0, 100),
    ...                         stage_y_nm=(0, 100))
    >>> xy = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 20.0], [30.0, 70.0]])
    >>> surrogate.update(xy, np.array([1.0, 2.0, 1.5, 0.5]))
    >>> mean, variance = surrogate(np.array([[50.0, 50.0], [100.0, 100.0]]))
    >>> bool(variance[0] < variance[1])
    True
    """

    def __init__(
        self,
        config: SurrogateConfig | None = None,
        feature_dim: int = 0,
        *,
        stage_x_nm: tuple[float, float] | None = None,
        stage_y_nm: tuple[float, float] | None = None,
        feature_variances: Sequence[float] | None = None,
        feature_weight_means: Sequence[float] | None = None,
    ) -> None:
        self.config = config if config is not None else SurrogateConfig()
        if feature_dim < 0:
            raise SurrogateError(f"feature_dim must be zero or positive, got {feature_dim}")
        if self.config.use_survey_features and feature_dim == 0:
            raise SurrogateError(
                "use_survey_features is on but feature_dim is 0; pass the number of survey feature "
                "columns (4 for agent.survey.survey_features) or turn use_survey_features off"
            )
        self.feature_dim = int(feature_dim) if self.config.use_survey_features else 0
        variances = (
            [1.0] * self.feature_dim if feature_variances is None else [float(v) for v in feature_variances]
        )
        if len(variances) != self.feature_dim or not all(math.isfinite(v) and v > 0 for v in variances):
            raise SurrogateError(
                f"feature_variances must give one positive variance per feature ({self.feature_dim}), "
                f"got {feature_variances}"
            )
        self._feature_variances = variances
        means = (
            [0.0] * self.feature_dim
            if feature_weight_means is None
            else [float(v) for v in feature_weight_means]
        )
        if len(means) != self.feature_dim or not all(math.isfinite(v) for v in means):
            raise SurrogateError(
                f"feature_weight_means must give one finite mean per feature ({self.feature_dim}), "
                f"got {feature_weight_means}"
            )
        self._weight_means = torch.tensor(means, dtype=_DTYPE)
        if stage_x_nm is not None and stage_y_nm is not None:
            self._origin = np.array([stage_x_nm[0], stage_y_nm[0]], dtype=np.float64)
            extent = max(stage_x_nm[1] - stage_x_nm[0], stage_y_nm[1] - stage_y_nm[0])
            self._scale_nm = float(extent) if extent > 0 else _DEFAULT_STAGE_SCALE_NM
        else:
            self._origin = np.zeros(2, dtype=np.float64)
            self._scale_nm = _DEFAULT_STAGE_SCALE_NM
        self._positions = np.zeros((0, 2), dtype=np.float64)
        self._values = np.zeros(0, dtype=np.float64)
        self._features = np.zeros((0, self.feature_dim), dtype=np.float64)
        self._value_mean = 0.0
        self._value_std = 1.0
        self._noise_constraint = constraints.interval(*self.config.noise_bounds)
        # Each model owns its kernel: Pyro refuses to attach a used composite kernel to a
        # second model. The prior kernel answers queries before any observation.
        self._prior_kernel = self._build_kernel()
        self._exact: gp.models.GPRegression | None = None
        self._sparse: gp.models.SparseGPRegression | None = None
        self._param_states: dict[str, dict[str, Any]] = {
            name: {"params": {}, "constraints": {}} for name in ("prior", "exact", "sparse")
        }
        self._fitted_once = False
        self._last_fit_s = 0.0
        self._last_fit_steps = 0
        self._last_fit_points = 0
        self._last_loss = math.nan

    # ------------------------------------------------------------------ construction

    def _build_kernel(self) -> gp.kernels.Kernel:
        """Position kernel, plus an ARD RBF kernel over the features when they are used."""
        config = self.config
        dims = 2 + self.feature_dim
        position_class = gp.kernels.Matern52 if config.kernel == "matern52" else gp.kernels.RBF
        linear = config.feature_kernel == "linear"
        share = _FEATURE_VARIANCE_SHARE if self.feature_dim and not linear else 0.0
        position = position_class(
            input_dim=2,
            variance=torch.tensor(1.0 - share, dtype=_DTYPE),
            lengthscale=torch.tensor(config.lengthscale_nm / self._scale_nm, dtype=_DTYPE),
            active_dims=[0, 1],
        )
        # Bounds keep a handful of Adam steps on few points from collapsing the lengthscale
        # (white noise) or inflating it past the stage (a constant).
        low, high = config.lengthscale_bounds_nm
        position.lengthscale = PyroParam(
            torch.tensor(config.lengthscale_nm / self._scale_nm, dtype=_DTYPE),
            constraints.interval(low / self._scale_nm, high / self._scale_nm),
        )
        position.variance = PyroParam(
            torch.tensor(1.0 - share, dtype=_DTYPE), constraints.interval(1e-3, 50.0)
        )
        if not self.feature_dim:
            return position
        if linear:
            # One linear term per feature, so each weight has its own prior variance (ARD).
            terms: gp.kernels.Kernel | None = None
            for column, variance in enumerate(self._feature_variances):
                term = gp.kernels.Linear(
                    input_dim=1, variance=torch.tensor(variance, dtype=_DTYPE), active_dims=[2 + column]
                )
                term.variance = PyroParam(
                    torch.tensor(variance, dtype=_DTYPE), constraints.interval(1e-4, 100.0)
                )
                terms = term if terms is None else gp.kernels.Sum(terms, term)
            return gp.kernels.Sum(position, terms)
        features = gp.kernels.RBF(
            input_dim=self.feature_dim,
            variance=torch.tensor(share, dtype=_DTYPE),
            lengthscale=torch.full((self.feature_dim,), config.feature_lengthscale, dtype=_DTYPE),
            active_dims=list(range(2, dims)),
        )
        features.lengthscale = PyroParam(
            torch.full((self.feature_dim,), config.feature_lengthscale, dtype=_DTYPE),
            constraints.interval(1e-2, 1e2),
        )
        features.variance = PyroParam(torch.tensor(share, dtype=_DTYPE), constraints.interval(1e-3, 50.0))
        return gp.kernels.Sum(position, features)

    def _prior_mean(self, X: torch.Tensor) -> torch.Tensor:
        """Prior mean at design rows ``X``: the features weighted by their prior means (0 without)."""
        if not self.feature_dim or self.config.feature_kernel != "linear":
            return torch.zeros(X.shape[0], dtype=X.dtype)
        return X[:, 2:] @ self._weight_means

    @contextmanager
    def _scope(self, model: str) -> Iterator[None]:
        """Run Pyro code against this model's own parameter store, without validation, few threads.

        Pyro modules sync their parameters with the global parameter store by name; two
        surrogates would otherwise silently share ``kernel.lengthscale``. Validation is
        turned off because the inputs are validated here and it costs a good share of a step.
        Matrices of a few hundred rows gain nothing from a thread pool, and on busy cores its
        spinning workers made a refit ten times slower, so torch runs single-threaded here
        (the setting is process-wide: restored on exit, not safe against concurrent torch work).
        """
        store = pyro.get_param_store()
        with self._threads(), store.scope(self._param_states[model]), pyro.validation_enabled(False):
            yield

    @contextmanager
    def _threads(self) -> Iterator[None]:
        """Limit torch's intra-op threads to ``config.torch_threads`` and restore them afterwards."""
        threads = torch.get_num_threads()
        wanted = self.config.torch_threads
        if wanted is not None and wanted != threads:
            torch.set_num_threads(wanted)
        try:
            yield
        finally:
            if wanted is not None and wanted != threads:
                torch.set_num_threads(threads)

    @property
    def _kernel(self) -> gp.kernels.Kernel:
        """The kernel holding the current hyper-parameters."""
        return self._exact.kernel if self._exact is not None else self._prior_kernel

    @property
    def _position_kernel(self) -> gp.kernels.Kernel:
        kernel = self._kernel
        return kernel.kern0 if isinstance(kernel, gp.kernels.Sum) else kernel

    # ------------------------------------------------------------------ validation

    def _inputs(self, positions_nm: Any, features: Any, count_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Validate positions and features; return them as float64 arrays."""
        positions = np.asarray(positions_nm, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != 2:
            raise SurrogateError(
                f"{count_name} positions must have shape (n, 2) as (x, y) in nm, got {positions.shape}"
            )
        if not np.isfinite(positions).all():
            raise SurrogateError(f"{count_name} positions contain NaN or infinite values")
        n = positions.shape[0]
        if not self.feature_dim:
            return positions, np.zeros((n, 0), dtype=np.float64)
        if features is None:
            raise SurrogateError(
                f"this surrogate uses {self.feature_dim} survey features per position "
                f"(use_survey_features is on); pass features with shape ({n}, {self.feature_dim})"
            )
        values = np.asarray(features, dtype=np.float64)
        if values.shape != (n, self.feature_dim):
            raise SurrogateError(
                f"{count_name} features must have shape ({n}, {self.feature_dim}), got {values.shape}"
            )
        if not np.isfinite(values).all():
            raise SurrogateError(f"{count_name} features contain NaN or infinite values")
        return positions, values

    def _design(self, positions: np.ndarray, features: np.ndarray) -> torch.Tensor:
        """Model inputs: normalised positions followed by the features."""
        normalised = (positions - self._origin) / self._scale_nm
        return torch.as_tensor(np.hstack([normalised, features]), dtype=_DTYPE)

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return int(self._values.shape[0])

    @property
    def sparse(self) -> bool:
        """True while the sparse GP is in use (more than ``exact_max_points`` observations)."""
        return self._sparse is not None

    @property
    def noise_variance(self) -> float:
        """Observation-noise variance, in score units squared."""
        noise = self._exact.noise if self._exact is not None else torch.tensor(self.config.noise_init)
        return float(noise.detach()) * self._value_std**2

    @property
    def observed_values(self) -> np.ndarray:
        """Values given to :meth:`update` so far, in order (a read-only view)."""
        view = self._values.view()
        view.setflags(write=False)
        return view

    def replace_features(self, features: Any) -> None:
        """Replace the features of the observations made so far (no refit until the next update).

        For features that change as a session goes on (how strongly a candidate lies on a
        domain wall seen since): the next :meth:`update` fits on the current values.

        Parameters
        ----------
        features : array_like
            Shape ``(len(self), feature_dim)``.

        Raises
        ------
        SurrogateError
            If the shape is wrong or a value is NaN or infinite.
        """
        _, values = self._inputs(self._positions, features, "observation")
        self._features = values

    def linear_weight_variances(self) -> list[float] | None:
        """Fitted prior variance of each feature's weight, standardised units (linear kernel only).

        A feature the interest follows gains variance as tiles come in; one it ignores loses it.
        """
        if not self.feature_dim or self.config.feature_kernel != "linear":
            return None
        terms = self._kernel.kern1
        variances = []
        while isinstance(terms, gp.kernels.Sum):
            variances.append(float(terms.kern1.variance.detach()))
            terms = terms.kern0
        variances.append(float(terms.variance.detach()))
        return variances[::-1]

    def update(self, positions_nm: Any, values: Any, features: Any = None) -> None:
        """Append observations and refit the hyper-parameters with a bounded number of steps.

        Parameters
        ----------
        positions_nm : array_like
            Observation positions ``(x, y)``, shape ``(n, 2)``, in stage nanometres.
        values : array_like
            Observed interest, shape ``(n,)``, in score units; must be finite.
        features : array_like or None
            Survey features at the positions, shape ``(n, feature_dim)``; required when the
            surrogate uses survey features, ignored otherwise.

        Raises
        ------
        SurrogateError
            If shapes disagree, or any value, position or feature is NaN or infinite.
        """
        positions, feature_values = self._inputs(positions_nm, features, "observation")
        observed = np.asarray(values, dtype=np.float64)
        if observed.ndim != 1 or observed.shape[0] != positions.shape[0]:
            raise SurrogateError(
                f"values must have shape ({positions.shape[0]},) to match the positions, got {observed.shape}"
            )
        bad = int(np.count_nonzero(~np.isfinite(observed)))
        if bad:
            raise SurrogateError(
                f"{bad} of {observed.size} values are NaN or infinite; replace missing scores "
                "(for example a tile without lattice) by a finite value before updating the surrogate"
            )
        if observed.size == 0:
            return
        self._positions = np.vstack([self._positions, positions])
        self._values = np.concatenate([self._values, observed])
        self._features = np.vstack([self._features, feature_values])
        self._refresh()

    def _refresh(self) -> None:
        """Restandardise, re-feed (or build) the models, refit, and hand the fit to the sparse GP."""
        n = len(self)
        self._value_mean = float(self._values.mean())
        spread = float(self._values.std()) if n > 1 else 0.0
        self._value_std = spread if spread > 1e-12 * max(1.0, abs(self._value_mean)) else 1.0
        X = self._design(self._positions, self._features)
        y = torch.as_tensor((self._values - self._value_mean) / self._value_std, dtype=_DTYPE)
        if self._exact is None:
            self._exact = gp.models.GPRegression(
                X, y, self._build_kernel(), noise=torch.tensor(self.config.noise_init, dtype=_DTYPE),
                mean_function=self._prior_mean, jitter=self.config.jitter,
            )  # fmt: skip
            self._exact.noise = PyroParam(
                torch.tensor(self.config.noise_init, dtype=_DTYPE), self._noise_constraint
            )
        if n >= self.config.fit_min_points:
            steps = self.config.fit_steps_update if self._fitted_once else self.config.fit_steps_initial
            self._fit(X, y, steps)
            self._fitted_once = True
        self._exact.set_data(X, y)
        if n <= self.config.exact_max_points:
            self._sparse = None
            return
        chosen = torch.as_tensor(_farthest_points(X.numpy(), self.config.inducing_points))
        if self._sparse is None:
            self._sparse = gp.models.SparseGPRegression(
                X, y, self._build_kernel(), X[chosen].clone(), mean_function=self._prior_mean, approx="VFE",
                jitter=self.config.jitter,
            )  # fmt: skip
            self._sparse.noise = PyroParam(
                torch.tensor(self.config.noise_init, dtype=_DTYPE), self._noise_constraint
            )
            # Inducing points are placed, not learned: a few Adam steps cannot move 64 x d
            # coordinates usefully, and re-placing them keeps each update cheap and deterministic.
            self._sparse.Xu.requires_grad_(False)
        else:
            self._sparse.set_data(X, y)
            with torch.no_grad():
                self._sparse.Xu.copy_(X[chosen])
        # The sparse model conditions on every point with the hyper-parameters fitted above.
        fitted = {key: value for key, value in self._exact.state_dict().items() if key != "Xu"}
        self._sparse.load_state_dict(fitted, strict=False)

    def _fit(self, X: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        """Adam on the exact negative log marginal likelihood of at most ``fit_max_points`` points.

        Beyond ``fit_max_points`` a seeded random subset is used: a step costs the cube of the
        points, and a random subset, unlike the newest points (clustered where the policy
        looks), estimates noise and lengthscale without bias. The sparse GP reuses this fit
        rather than optimising its own bound, whose gradient costs several times more per step.
        """
        model = self._exact
        assert model is not None
        start = time.perf_counter()
        n = X.shape[0]
        if n > self.config.fit_max_points:
            rng = np.random.default_rng([self.config.seed, n])
            subset = torch.as_tensor(np.sort(rng.choice(n, self.config.fit_max_points, replace=False)))
            X, y = X[subset], y[subset]
        model.set_data(X, y)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.config.learning_rate)
        loss_fn = Trace_ELBO().differentiable_loss
        loss = torch.tensor(math.nan)
        sigma = self.config.lengthscale_prior_sigma
        prior_log_length = math.log(self.config.lengthscale_nm / self._scale_nm)
        with self._scope("exact"):
            for _ in range(steps):
                optimizer.zero_grad()
                loss = loss_fn(model.model, model.guide)
                if sigma is not None:
                    # MAP rather than maximum likelihood: a log-normal prior on the lengthscale, so
                    # a few outlying tiles cannot shrink it to the bound (every tile independent).
                    # Written out here because the kernel's lengthscale stays a bounded PyroParam,
                    # which the sparse GP takes over as it is.
                    length = self._position_kernel.lengthscale
                    loss = loss + 0.5 * ((torch.log(length) - prior_log_length) / sigma) ** 2
                loss.backward()
                optimizer.step()
        self._last_fit_s = time.perf_counter() - start
        self._last_fit_steps = steps
        self._last_fit_points = int(X.shape[0])
        self._last_loss = float(loss.detach()) / max(int(X.shape[0]), 1)

    def predict(
        self, positions_nm: Any, features: Any = None, full_cov: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance (or covariance) of the interest, without observation noise.

        Parameters
        ----------
        positions_nm : array_like
            Query positions ``(x, y)``, shape ``(m, 2)``, in stage nanometres.
        features : array_like or None
            Survey features at the query positions, shape ``(m, feature_dim)``; required when
            the surrogate uses survey features.
        full_cov : bool
            Return the ``(m, m)`` posterior covariance instead of the ``(m,)`` variances.

        Returns
        -------
        mean : numpy.ndarray
            Posterior mean, shape ``(m,)``, in score units.
        variance : numpy.ndarray
            Posterior variance ``(m,)`` or covariance ``(m, m)`` of the latent interest, in score
            units squared. With no observations: the prior (mean 0, the kernel variance).
        """
        positions, feature_values = self._inputs(positions_nm, features, "query")
        X = self._design(positions, feature_values)
        if self._exact is None:
            with torch.no_grad(), self._scope("prior"):
                mean = self._prior_mean(X)
                kernel = self._prior_kernel
                spread = kernel(X) if full_cov else kernel(X, diag=True)
        else:
            name, model = ("sparse", self._sparse) if self._sparse is not None else ("exact", self._exact)
            with torch.no_grad(), self._scope(name):
                mean, spread = model(X, full_cov=full_cov, noiseless=True)
        scale = self._value_std
        mean_np = mean.numpy() * scale + self._value_mean
        spread_np = spread.numpy() * scale**2
        if not full_cov:
            # Cancellation in the posterior-variance formula can leave tiny negative values.
            spread_np = np.clip(spread_np, 0.0, None)
        return mean_np, spread_np

    def __call__(self, positions_nm: Any, features: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance at ``positions_nm``; see :meth:`predict`.

        Parameters
        ----------
        positions_nm : array_like
            Query positions, shape ``(m, 2)``, in stage nanometres.
        features : array_like or None
            Survey features, shape ``(m, feature_dim)``, when the surrogate uses them.

        Returns
        -------
        mean, variance : numpy.ndarray
            Shape ``(m,)`` each, in score units and score units squared.
        """
        return self.predict(positions_nm, features, full_cov=False)

    def sample(
        self, positions_nm: Any, features: Any, n_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Joint posterior samples of the interest at the query positions (for Thompson sampling).

        Parameters
        ----------
        positions_nm : array_like
            Query positions, shape ``(m, 2)``, in stage nanometres.
        features : array_like or None
            Survey features, shape ``(m, feature_dim)``, when the surrogate uses them.
        n_samples : int
            Number of samples.
        rng : numpy.random.Generator
            Source of randomness (seed it for reproducible sessions).

        Returns
        -------
        numpy.ndarray
            Samples of the latent interest, shape ``(n_samples, m)``, in score units.
        """
        if n_samples < 0:
            raise SurrogateError(f"n_samples must be zero or positive, got {n_samples}")
        mean, covariance = self.predict(positions_nm, features, full_cov=True)
        normals = rng.standard_normal((n_samples, mean.shape[0]))
        # In torch under the thread limit: numpy's threaded BLAS took ten times longer for
        # this factorisation on busy cores.
        with self._threads():
            factor = _cholesky(torch.as_tensor(covariance, dtype=_DTYPE))
            draws = torch.as_tensor(normals, dtype=_DTYPE) @ factor.T
        return mean[None, :] + draws.numpy()

    def summary(self) -> dict[str, Any]:
        """State of the model, JSON-serialisable.

        Returns
        -------
        dict
            ``n_points``; ``sparse``; ``kernel``; ``lengthscale_nm`` (position); ``variance``
            (position kernel, score units squared); ``noise`` (score units squared);
            ``feature_variance`` and ``feature_lengthscales`` (None without survey features);
            ``value_mean``, ``value_std`` (the standardisation); ``last_fit_s`` (seconds),
            ``last_fit_steps``, ``last_fit_points``, ``last_loss`` (negative log marginal
            likelihood per fitted point, standardised units; None before the first fit);
            ``inducing_points`` (0 for the exact GP).
        """
        position = self._position_kernel
        scale2 = self._value_std**2
        feature_variance: float | None = None
        feature_lengthscales: list[float] | None = None
        if isinstance(self._kernel, gp.kernels.Sum) and self.config.feature_kernel == "rbf":
            feature_variance = float(self._kernel.kern1.variance.detach()) * scale2
            feature_lengthscales = [float(v) for v in self._kernel.kern1.lengthscale.detach()]
        return {
            "n_points": len(self),
            "sparse": self.sparse,
            "kernel": self.config.kernel,
            "lengthscale_nm": float(position.lengthscale.detach()) * self._scale_nm,
            "variance": float(position.variance.detach()) * scale2,
            "noise": self.noise_variance,
            "feature_variance": feature_variance,
            "feature_lengthscales": feature_lengthscales,
            "linear_weight_variances": self.linear_weight_variances(),
            "value_mean": self._value_mean,
            "value_std": self._value_std,
            "last_fit_s": self._last_fit_s,
            "last_fit_steps": self._last_fit_steps,
            "last_fit_points": self._last_fit_points,
            "last_loss": None if math.isnan(self._last_loss) else self._last_loss,
            "inducing_points": self.config.inducing_points if self.sparse else 0,
        }


def _cholesky(covariance: torch.Tensor) -> torch.Tensor:
    """A factor ``L`` with ``L @ L.T`` = covariance (lower Cholesky, adding jitter until it works)."""
    m = covariance.shape[0]
    if m == 0:
        return covariance.new_zeros((0, 0))
    scale = max(float(torch.diagonal(covariance).mean()), 1e-12)
    jitter = 1e-10 * scale
    identity = torch.eye(m, dtype=covariance.dtype)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(covariance + jitter * identity)
        if int(info) == 0:
            return factor
        jitter *= 10.0
    # Last resort for a numerically indefinite matrix: clip negative eigenvalues.
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return eigenvectors * eigenvalues.clamp(min=0.0).sqrt()[None, :]
