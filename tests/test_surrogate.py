"""The Pyro GP surrogate: fit quality, uncertainty, sparse switch, survey features, errors."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import MicrographyError
from agent.surrogate import GPSurrogate, SurrogateConfig, SurrogateError

STAGE = {"stage_x_nm": (0.0, 150.0), "stage_y_nm": (0.0, 150.0)}
FAST = SurrogateConfig(fit_steps_initial=60, fit_steps_update=10)


def smooth(points: np.ndarray) -> np.ndarray:
    """A smooth interest field over a 150 nm stage (lengthscale a few tens of nm)."""
    return np.sin(points[:, 0] / 25.0) * np.cos(points[:, 1] / 30.0)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def query() -> np.ndarray:
    return np.random.default_rng(99).random((300, 2)) * 150.0


def test_prior_before_any_observation() -> None:
    surrogate = GPSurrogate(FAST, **STAGE)
    mean, variance = surrogate(np.array([[10.0, 20.0], [140.0, 5.0]]))
    assert np.array_equal(mean, [0.0, 0.0])
    np.testing.assert_allclose(variance, [1.0, 1.0])
    assert surrogate.summary()["n_points"] == 0
    assert len(surrogate) == 0


def test_fits_a_smooth_field_with_small_uncertainty_near_data(query: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    # Observations only on the left half of the stage.
    points = rng.random((80, 2)) * [75.0, 150.0]
    surrogate = GPSurrogate(FAST, **STAGE)
    surrogate.update(points, smooth(points) + 0.02 * rng.standard_normal(80))
    left = query[query[:, 0] < 70.0]
    mean, _ = surrogate(left)
    assert rmse(mean, smooth(left)) < 0.1
    _, near = surrogate(points[:10])
    _, far = surrogate(np.array([[148.0, 5.0], [148.0, 145.0]]))
    prior = surrogate.summary()["variance"]
    assert near.max() < 0.05 * prior
    assert far.min() > 0.5 * prior
    summary = surrogate.summary()
    assert summary["sparse"] is False
    assert 5.0 < summary["lengthscale_nm"] < 200.0
    assert summary["last_fit_steps"] == 60


def test_incremental_updates_refit_with_the_update_budget(query: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    points = rng.random((60, 2)) * 150.0
    surrogate = GPSurrogate(FAST, **STAGE)
    surrogate.update(points[:20], smooth(points[:20]))
    for start in range(20, 60, 10):
        surrogate.update(points[start : start + 10], smooth(points[start : start + 10]))
    assert surrogate.summary()["last_fit_steps"] == FAST.fit_steps_update
    assert len(surrogate) == 60
    mean, _ = surrogate(query)
    assert rmse(mean, smooth(query)) < 0.15


def test_switches_to_the_sparse_gp_beyond_exact_max_points(query: np.ndarray) -> None:
    config = SurrogateConfig(
        exact_max_points=40, inducing_points=40, fit_max_points=40, fit_steps_initial=60, fit_steps_update=10
    )
    rng = np.random.default_rng(2)
    points = rng.random((160, 2)) * 150.0
    values = smooth(points) + 0.02 * rng.standard_normal(160)
    surrogate = GPSurrogate(config, **STAGE)
    surrogate.update(points[:40], values[:40])
    assert surrogate.sparse is False
    surrogate.update(points[40:], values[40:])
    assert surrogate.sparse is True
    summary = surrogate.summary()
    assert summary["sparse"] is True and summary["inducing_points"] == 40
    assert summary["last_fit_points"] == 40
    mean, variance = surrogate(query)
    assert rmse(mean, smooth(query)) < 0.15
    assert np.all(variance >= 0)
    samples = surrogate.sample(query[:20], None, 4, np.random.default_rng(0))
    assert samples.shape == (4, 20)


def test_survey_feature_kernel_helps_when_interest_follows_the_feature() -> None:
    rng = np.random.default_rng(3)
    points = rng.random((140, 2)) * 150.0
    # Interest set by a survey feature that has no spatial structure at the grid scale.
    features = rng.standard_normal((140, 4))
    values = np.tanh(features[:, 0]) + 0.05 * rng.standard_normal(140)
    train, test = slice(0, 100), slice(100, 140)
    plain = GPSurrogate(FAST, **STAGE)
    plain.update(points[train], values[train])
    additive = GPSurrogate(FAST.model_copy(update={"use_survey_features": True}), feature_dim=4, **STAGE)
    additive.update(points[train], values[train], features[train])
    truth = np.tanh(features[test, 0])
    plain_error = rmse(plain(points[test])[0], truth)
    additive_error = rmse(additive(points[test], features[test])[0], truth)
    assert additive_error < 0.5 * plain_error
    summary = additive.summary()
    assert summary["feature_variance"] is not None and len(summary["feature_lengthscales"]) == 4
    # The relevant feature gets the shortest lengthscale.
    assert int(np.argmin(summary["feature_lengthscales"])) == 0


def test_deterministic_and_independent_of_other_surrogates(query: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    points = rng.random((50, 2)) * 150.0
    values = smooth(points)

    def run(interleave: bool) -> tuple[np.ndarray, np.ndarray]:
        surrogate = GPSurrogate(FAST, **STAGE)
        other = GPSurrogate(FAST.model_copy(update={"kernel": "rbf", "lengthscale_nm": 5.0}), **STAGE)
        for start in range(0, 50, 10):
            chunk = slice(start, start + 10)
            surrogate.update(points[chunk], values[chunk])
            if interleave:
                # A second model in the same process must not share Pyro's global parameters.
                other.update(points[chunk], -values[chunk])
        return surrogate(query)

    first, second, interleaved = run(False), run(False), run(True)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert np.array_equal(first[0], interleaved[0]) and np.array_equal(first[1], interleaved[1])


def test_thompson_samples_follow_the_posterior(query: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    points = rng.random((40, 2)) * 150.0
    surrogate = GPSurrogate(FAST, **STAGE)
    surrogate.update(points, smooth(points))
    mean, variance = surrogate(query[:30])
    samples = surrogate.sample(query[:30], None, 4000, np.random.default_rng(0))
    again = surrogate.sample(query[:30], None, 4000, np.random.default_rng(0))
    assert samples.shape == (4000, 30)
    assert np.array_equal(samples, again)
    spread = np.sqrt(variance.max()) + 1e-3
    np.testing.assert_allclose(samples.mean(axis=0), mean, atol=0.1 * spread)
    np.testing.assert_allclose(samples.var(axis=0), variance, rtol=0.15, atol=1e-4)


def test_full_covariance_matches_the_variances(query: np.ndarray) -> None:
    rng = np.random.default_rng(6)
    points = rng.random((30, 2)) * 150.0
    surrogate = GPSurrogate(FAST, **STAGE)
    surrogate.update(points, smooth(points))
    mean, variance = surrogate.predict(query[:25])
    mean_full, covariance = surrogate.predict(query[:25], full_cov=True)
    np.testing.assert_allclose(mean, mean_full)
    np.testing.assert_allclose(np.diag(covariance), variance, rtol=1e-6, atol=1e-9)


def test_bad_inputs_raise_clear_errors() -> None:
    surrogate = GPSurrogate(FAST, **STAGE)
    with pytest.raises(SurrogateError, match="NaN"):
        surrogate.update(np.zeros((2, 2)), np.array([1.0, np.nan]))
    with pytest.raises(SurrogateError, match=r"shape \(n, 2\)"):
        surrogate.update(np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(SurrogateError, match=r"values must have shape \(3,\)"):
        surrogate.update(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(SurrogateError, match="positions contain NaN"):
        surrogate(np.array([[np.nan, 1.0]]))
    assert len(surrogate) == 0  # nothing was appended by the failed updates
    with pytest.raises(SurrogateError, match="feature_dim is 0"):
        GPSurrogate(FAST.model_copy(update={"use_survey_features": True}))
    featured = GPSurrogate(FAST.model_copy(update={"use_survey_features": True}), feature_dim=3, **STAGE)
    with pytest.raises(SurrogateError, match="pass features"):
        featured.update(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(SurrogateError, match=r"features must have shape \(2, 3\)"):
        featured.update(np.zeros((2, 2)), np.zeros(2), np.zeros((2, 4)))
    assert issubclass(SurrogateError, MicrographyError)


def test_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="inducing_points"):
        SurrogateConfig(exact_max_points=20, inducing_points=64)
    with pytest.raises(ValueError, match="lengthscale_nm"):
        SurrogateConfig(lengthscale_nm=0.5, lengthscale_bounds_nm=(1.0, 100.0))
    with pytest.raises(ValueError, match="extra"):
        SurrogateConfig(lenghtscale_nm=3.0)


def _heavy_tailed_policy(transform: str, prior_sigma: float | None):  # type: ignore[no-untyped-def]
    """A guided policy fed 40 tiles of a smooth field (about 1) of which three score in the hundreds."""
    from agent.policy import GuidedPolicy, PolicyConfig
    from agent.survey import CandidateGrid
    from tests.test_policy import STEM, interest

    grid = CandidateGrid.tiling(STEM, (500, 500), 0.02)  # 10 nm tiles
    surrogate = GPSurrogate(
        SurrogateConfig(lengthscale_prior_sigma=prior_sigma),
        stage_x_nm=STEM.stage_x_nm,
        stage_y_nm=STEM.stage_y_nm,
    )
    policy = GuidedPolicy(grid, STEM, surrogate, PolicyConfig(name="g", interest_transform=transform))
    rng = np.random.default_rng(3)
    for k, index in enumerate(rng.choice(len(grid), 40, replace=False)):
        value = float(interest(grid.centres[[index]])[0]) + rng.normal(0, 0.05)
        if k in (10, 20, 30):
            value = 300.0 + rng.uniform(0, 500)  # a dislocation core's tile
        policy.ingest([grid.request(int(index), 2.0, request_id=f"t{k}")], [value])
    return policy, grid


def test_a_heavy_tailed_score_does_not_pin_the_lengthscale_to_its_bound() -> None:
    low = SurrogateConfig().lengthscale_bounds_nm[0]
    pinned, _ = _heavy_tailed_policy("none", None)
    # Maximum likelihood on raw interest makes every tile independent: the failure guarded against.
    assert pinned.surrogate.summary()["lengthscale_nm"] < 1.05 * low
    held, grid = _heavy_tailed_policy("log1p", 0.5)
    pitch = grid.tile_size_nm[0]
    assert held.surrogate.summary()["lengthscale_nm"] > 0.5 * pitch
    assert held.model_unit == "log(1 + RMS z)"
    assert held.surrogate.observed_values.max() < 7.0  # log(1 + 800)


def test_uncertainty_shrinks_near_imaged_tiles_and_not_far_from_them() -> None:
    policy, grid = _heavy_tailed_policy("log1p", 0.5)
    _, variance = policy.posterior()
    sd = np.sqrt(variance)
    acquired = policy.acquired
    centres = grid.centres
    distance = np.min(
        np.hypot(*(centres[:, None, :] - centres[acquired][None, :, :]).transpose(2, 0, 1)), axis=1
    )
    pitch = grid.tile_size_nm[0]
    neighbours = (distance > 0) & (distance <= 1.01 * pitch)
    far = distance >= 2.9 * pitch
    assert far.any() and neighbours.any()
    # Beside an imaged tile the model knows more than three pitches from any, where it keeps its
    # prior uncertainty: the map is not "imaged or not" (a lengthscale at its bound).
    assert np.median(sd[neighbours]) < 0.95 * np.median(sd[far])
    assert np.median(sd[acquired]) < 0.8 * np.median(sd[neighbours])
    assert np.median(sd[far]) > 0.97 * sd.max()


def test_a_linear_input_the_interest_follows_gains_weight_and_an_idle_one_loses_it() -> None:
    rng = np.random.default_rng(4)
    positions = rng.uniform(0, 100, (60, 2))
    followed, idle = rng.normal(0, 1, 60), rng.normal(0, 1, 60)
    # Interest follows the first input (a survey feature), not the second, nor position.
    values = 3.0 * followed + rng.normal(0, 0.3, 60)
    config = SurrogateConfig(use_survey_features=True, feature_kernel="linear", fit_steps_initial=200)
    surrogate = GPSurrogate(
        config, 2, stage_x_nm=(0, 100), stage_y_nm=(0, 100), feature_variances=[0.5, 0.5],
        feature_weight_means=[0.0, 0.0],
    )  # fmt: skip
    surrogate.update(positions[:8], values[:8], np.column_stack([followed, idle])[:8])
    early = surrogate.linear_weight_variances()
    surrogate.update(positions[8:], values[8:], np.column_stack([followed, idle])[8:])
    late = surrogate.linear_weight_variances()
    assert early is not None and late is not None
    assert late[0] > 0.5 and late[0] >= early[0] * 0.9
    assert late[1] < 0.1
    # The model then predicts the interest from the input alone, anywhere on the stage.
    query = np.array([[50.0, 50.0], [50.0, 50.0]])
    mean, _ = surrogate(query, np.array([[2.0, 0.0], [-2.0, 0.0]]))
    assert mean[0] - mean[1] == pytest.approx(12.0, rel=0.15)


def test_linear_inputs_start_from_their_prior_mean_and_can_be_refreshed() -> None:
    config = SurrogateConfig(use_survey_features=True, feature_kernel="linear")
    surrogate = GPSurrogate(
        config,
        1,
        stage_x_nm=(0, 100),
        stage_y_nm=(0, 100),
        feature_variances=[1.0],
        feature_weight_means=[2.0],
    )
    mean, _ = surrogate(np.array([[10.0, 10.0], [90.0, 90.0]]), np.array([[1.0], [0.0]]))
    assert mean.tolist() == pytest.approx([2.0, 0.0])  # before any tile: the prior belief
    surrogate.update(np.array([[10.0, 10.0], [60.0, 60.0]]), np.array([1.0, 2.0]), np.array([[0.0], [0.0]]))
    surrogate.replace_features(np.array([[1.0], [0.5]]))
    assert surrogate._features.tolist() == [[1.0], [0.5]]
    with pytest.raises(SurrogateError, match=r"features must have shape \(2, 1\)"):
        surrogate.replace_features(np.ones((3, 1)))
    with pytest.raises(SurrogateError, match="one positive variance per feature"):
        GPSurrogate(config, 1, feature_variances=[1.0, 2.0])
