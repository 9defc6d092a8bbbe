"""k-means weight sharing (Deep Compression) against hand-worked clusters and scikit-learn's KMeans."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.cluster import KMeans

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.kmeans import KMeansQuantizer, init_centroids, kmeans_1d

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1.0, -1.0, 3e38, -3e38]
VALUES = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=False, allow_infinity=False))
ARRAYS = st.one_of(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 8)), elements=VALUES),
    st.builds(lambda v, n: np.full((3, n), v, np.float32), VALUES, st.integers(1, 5)),
)


def fitted(w: torch.Tensor, **kwargs) -> KMeansQuantizer:
    q = KMeansQuantizer(**kwargs)
    q.fit(w)
    return q


# --- by hand ------------------------------------------------------------------------------------------------


def test_two_clusters_by_hand():
    # linear init over [0, 12]: centroids 0, 12, midpoint 6 -> {0, 1, 2} and {10, 11, 12}, means 1 and 11
    w = torch.tensor([0.0, 10.0, 1.0, 12.0, 2.0, 11.0])
    q = fitted(w, bits=1)
    assert q.codebook.tolist() == [1.0, 11.0]
    assert q.indices.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(q(w), torch.tensor([1.0, 11.0, 1.0, 11.0, 1.0, 11.0]))


def test_lloyd_moves_centroids_by_hand():
    # init 0, 10 (midpoint 5): {0, 2, 3} -> 5/3 and {10} -> 10; the next midpoint 35/6 keeps the split
    centroids, labels = kmeans_1d(np.array([0.0, 2.0, 3.0, 10.0]), 2)
    np.testing.assert_allclose(centroids, [5 / 3, 10.0])
    assert labels.tolist() == [0, 0, 0, 1]


def test_initialisations_by_hand():
    values = np.array([3.0, 0.0, 2.0, 1.0])
    np.testing.assert_allclose(init_centroids(values, 4, "linear", 0), [0, 1, 2, 3])
    # quantiles at (i + 1/2) / 2 = 0.25, 0.75 of {0, 1, 2, 3}: positions 0.75 and 2.25 -> 0.75, 2.25
    np.testing.assert_allclose(init_centroids(values, 2, "density", 0), [0.75, 2.25])
    drawn = init_centroids(values, 3, "random", 5)
    assert set(drawn) <= set(values) and len(set(drawn)) == 3 and list(drawn) == sorted(drawn)


def test_random_init_is_deterministic_for_a_seed():
    w = torch.randn(200, generator=torch.Generator().manual_seed(0))
    a, b = fitted(w, bits=3, init="random", seed=3), fitted(w, bits=3, init="random", seed=3)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.indices, b.indices)
    values = w.double().numpy()
    assert not np.array_equal(init_centroids(values, 8, "random", 3), init_centroids(values, 8, "random", 4))


# --- scikit-learn oracle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,init", [(2, "linear"), (4, "linear"), (3, "density"), (4, "random")])
def test_same_inertia_as_scikit_learn_from_the_same_start(bits, init):
    k = 2**bits
    w = torch.randn(1500, generator=torch.Generator().manual_seed(bits))
    values = w.double().numpy()
    start = init_centroids(values, k, init, seed=1)
    reference = KMeans(n_clusters=k, init=start.reshape(-1, 1), n_init=1, algorithm="lloyd", max_iter=300, tol=0)
    reference.fit(values.reshape(-1, 1))
    assert np.unique(reference.labels_).size == k  # no empty cluster, so both run plain Lloyd

    q = fitted(w, bits=bits, init=init, iters=300, seed=1)
    codebook = q.codebook.detach().double().numpy()
    inertia = np.sum((values - codebook[q.indices.numpy()]) ** 2)
    assert inertia == pytest.approx(reference.inertia_, rel=1e-6)
    np.testing.assert_allclose(codebook, np.sort(reference.cluster_centers_.ravel()), rtol=1e-6, atol=1e-7)


# --- codebook fine-tuning -----------------------------------------------------------------------------------


def test_centroid_gradient_is_sum_of_member_gradients():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 10, generator=gen).requires_grad_(True)
    q = fitted(w.detach(), bits=3)
    upstream = torch.randn(6, 10, generator=gen)
    q(w).backward(upstream)
    expected = [float(upstream[q.indices == j].double().sum()) for j in range(8)]
    np.testing.assert_allclose(q.codebook.grad.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, torch.zeros_like(w))  # sharing fixes the weights


def test_training_updates_centroids_and_keeps_indices():
    w = torch.randn(40, generator=torch.Generator().manual_seed(3))
    q = fitted(w, bits=2)
    indices, before = q.indices.clone(), q.codebook.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    (q(w) - 1.0).square().sum().backward()  # d/dc_j = 2 n_j (c_j - 1), n_j the members of cluster j
    opt.step()
    members = torch.bincount(indices, minlength=4).float()
    torch.testing.assert_close(q.codebook.detach(), before - 0.01 * 2 * members * (before - 1))
    assert torch.equal(q.indices, indices)
    assert torch.equal(q(w), q.codebook.detach()[indices])


# --- fewer values than centroids, zeros, state ---------------------------------------------------------------


def test_constant_weights_quantize_to_themselves():
    w = torch.full((3, 4), 0.3)
    q = fitted(w, bits=4)
    assert torch.equal(q(w), w)
    assert torch.equal(decode(q.encode(w)), w)


def test_empty_clusters_keep_their_previous_centroid():
    # linear init on {1, 2} with 4 centroids: 1, 4/3, 5/3, 2; the middle two get no weight and stay put
    w = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0])
    q = fitted(w, bits=2)
    torch.testing.assert_close(q.codebook.detach(), torch.tensor([1.0, 4 / 3, 5 / 3, 2.0]))
    assert q.indices.tolist() == [0, 0, 3, 3, 3]
    assert torch.equal(q(w), w)


def test_keep_zero_reserves_code_zero_and_never_trains_it():
    w = torch.tensor([0.0, -1.0, -1.2, 0.0, 2.0, 2.4, 0.0, 5.0])
    q = fitted(w, bits=2, keep_zero=True)
    # the 3 other centroids come from the non-zero weights alone
    centroids, _ = kmeans_1d(np.array([-1.0, -1.2, 2.0, 2.4, 5.0], dtype=np.float32).astype(np.float64), 3)
    np.testing.assert_allclose(q.codebook.detach().numpy()[1:], centroids, rtol=1e-6)
    assert q.indices[w == 0].tolist() == [0, 0, 0] and (q.indices[w != 0] > 0).all()
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q(w).sum().backward()
    assert q.codebook.grad[0] == 0
    opt.step()
    y = q(w)
    assert (y[w == 0] == 0).all() and torch.equal(decode(q.encode(w)), y)


def test_fit_is_on_first_forward_and_state_dict_round_trip():
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    q = KMeansQuantizer(bits=2)
    assert not q.fitted
    y = q(w)
    assert q.fitted and set(q.state_dict()) == {"codebook", "indices", "fitted"}
    loaded = get(q.spec())
    loaded.load_state_dict(q.state_dict())
    assert loaded.fitted and torch.equal(loaded.indices, q.indices)
    assert torch.equal(loaded(torch.zeros(5, 3)), y)  # fitted: the shared values, not a new clustering


def test_shape_change_is_config_error_naming_tensor():
    q = fitted(torch.randn(4, 3), bits=2)
    q.label = "fc1.weight"
    with pytest.raises(ConfigError, match=r"fc1\.weight.*\(4, 3\)"):
        q(torch.randn(3, 4))


def test_empty_tensor_gives_empty_codes():
    q = KMeansQuantizer(bits=2)
    assert q(torch.zeros(0, 3)).shape == (0, 3)


# --- properties ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(ARRAYS, st.integers(1, 4), st.sampled_from(["linear", "density", "random"]), st.booleans())
def test_property_nearest_centroid_and_encodable(a, bits, init, keep_zero):
    w = torch.from_numpy(a)
    q = KMeansQuantizer(bits=bits, init=init, iters=10, keep_zero=keep_zero).eval()
    y = q(w)
    enc = q.encode(w)
    assert enc.kind == "codebook" and enc.bits == bits and enc.params["codebook"].shape == (2**bits,)
    assert torch.equal(decode(enc), y)
    codebook = enc.params["codebook"].double()
    values = w.double().reshape(-1, 1)
    live = codebook if not keep_zero else codebook[1:]
    distance = (values - live.reshape(1, -1)).abs().min(dim=1).values
    got = (values.ravel() - y.double().ravel()).abs()
    if keep_zero:
        assert (y[w == 0] == 0).all()
        got, distance = got[w.ravel() != 0], distance[w.ravel() != 0]
    # each weight takes its nearest centroid (up to the float32 rounding of the codebook)
    assert (got <= distance + 1e-6 * values.abs().max() + 1e-38).all()


@settings(max_examples=30, deadline=None)
@given(ARRAYS, st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 100))
def test_property_non_finite_is_calibration_error_naming_tensor(a, bad, where):
    a = a.copy()
    a.flat[where % a.size] = bad
    q = KMeansQuantizer(bits=2)
    q.label = "features.0.weight"
    for call in (q, q.encode, q.fit):
        with pytest.raises(CalibrationError, match=r"features\.0\.weight"):
            call(torch.from_numpy(a))


# --- configuration ------------------------------------------------------------------------------------------


def test_spec_round_trip():
    spec = {"name": "kmeans", "bits": 5, "init": "density", "iters": 7, "seed": 11, "keep_zero": True}
    q = get(spec)
    assert q.spec() == spec and get(q.spec()) == q
    assert get("kmeans").spec() == {"name": "kmeans", "bits": 4, "init": "linear", "iters": 30, "seed": 0,
                                    "keep_zero": False}


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 0}, {"bits": 9}, {"init": "kmeans++"}, {"iters": -1}, {"iters": 1.5}, {"seed": "a"}, {"seed": None},
     {"keep_zero": 1}],
)
def test_bad_config_is_config_error(kwargs):
    with pytest.raises(ConfigError):
        KMeansQuantizer(**kwargs)
