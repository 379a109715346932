"""Disentanglement metrics against encoders whose answer is known: one that outputs the true
factors (MIG and the FactorVAE score near 1), a random rotation of them (MIG low, the score still
high), and noise (MIG near 0, the score near chance); the mutual information
against its closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vaelab.disentanglement import entropy, factorvae_score, mig, mutual_information

SIZES = (4, 6, 10, 8)  # four independent factors, at most 20 values each (MIG's bins)
N = 20_000


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, s, N) for s in SIZES], axis=1)


def true_codes(f):
    return (f / (np.array(SIZES) - 1)).astype(np.float64)  # each factor's value, scaled to [0, 1]


def rotated(f):
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(len(SIZES), len(SIZES))))
    z = (true_codes(f) - 0.5) / 0.3
    return z @ q  # every code mixes every factor


def test_mutual_information_has_its_closed_forms():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, 100_000)
    assert mutual_information(a, a) == pytest.approx(entropy(a))  # I(a; a) = H(a)
    assert entropy(a) == pytest.approx(math.log(5), abs=1e-3)
    assert mutual_information(a, rng.integers(0, 5, 100_000)) < 1e-3  # independent: 0
    assert mutual_information(a, a // 2) == pytest.approx(entropy(a // 2))  # a function of a


def test_mig_of_the_true_factors_is_near_one(factors):
    assert mig(true_codes(factors), factors)["mig"] > 0.95


def test_mig_of_a_rotation_and_of_noise_is_low(factors):
    assert mig(rotated(factors), factors)["mig"] < 0.35  # every code mixes every factor
    noise = np.random.default_rng(3).normal(size=(N, len(SIZES)))
    assert mig(noise, factors)["mig"] < 0.02


def test_mig_skips_a_factor_with_one_value(factors):
    constant = np.concatenate([factors, np.zeros((N, 1), dtype=factors.dtype)], axis=1)
    result = mig(true_codes(factors), constant)
    assert result["per_factor"][-1] is None and result["mig"] > 0.95


def score(encode, factors, seed=0):
    return factorvae_score(encode, lambda rows: factors[rows], factors, rng=np.random.default_rng(seed),
                           votes=400, batch=32)["factorvae"]


def test_the_factorvae_score_of_the_true_factors_is_one(factors):
    assert score(true_codes, factors) == 1.0


def test_the_factorvae_score_of_a_rotation_is_lower_and_of_noise_is_chance(factors):
    """(The score only asks which code varies least when a factor is fixed: a rotation keeps most
    of that, so it stays high where MIG falls, which is why MIG is the sharper measure.)"""
    assert 0.8 < score(rotated, factors) < 1.0
    noise_rng = np.random.default_rng(4)
    noise = score(lambda f: noise_rng.normal(size=(len(f), len(SIZES))), factors)
    assert abs(noise - 1 / len(SIZES)) < 0.12
