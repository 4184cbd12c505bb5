"""Convergence diagnostics of MCMC draws: rank-normalised split-R-hat, bulk and tail ESS.

The definitions are those of Vehtari, Gelman, Simpson, Carpenter and Bürkner (2021),
"Rank-normalization, folding, and localization: an improved R-hat for assessing convergence of
MCMC", Bayesian Analysis 16(2). Every function takes the draws of one scalar quantity as an
array of shape (chains, draws) and matches ArviZ's `rhat(method="rank")`, `ess(method="bulk")`
and `ess(method="tail")` (tests/test_diagnostics.py checks that to 1e-6), edge cases included:

* any NaN draw, fewer than 4 draws per chain, or (for R-hat) fewer than 2 chains: NaN;
* every draw equal: R-hat NaN (0/0: no variance between or within chains), ESS = the number of
  (split) draws;
* every chain constant but at different values: R-hat inf (variance only between chains);
* one stuck (constant) chain among moving ones: ordinary finite values (R-hat well above 1).

Steps, in the paper's terms:

1. **Split** each chain into its first and last halves (an odd middle draw is dropped), so a
   chain that drifts looks like two chains that disagree.
2. **Rank-normalise**: replace every draw by the normal quantile of its fractional rank among
   all S draws, z = Φ⁻¹((r − 3/8) / (S + 1/4)) (Blom's offset; tied draws share their average
   rank). This makes R-hat and ESS well defined for heavy tails and invariant to monotone
   transformations.
3. **R-hat** of z: sqrt(((N − 1)/N · W + B/N) / W) with N draws per split chain, W the mean
   within-chain variance and B/N the variance of the chain means. The bulk R-hat uses z of
   the draws; the tail (folded) R-hat uses z of |draw − median|, which sees chains with equal
   location but different scale. The reported R-hat is the larger of the two.
4. **ESS** = S / τ, τ = −1 + 2 Σ ρ̂_t summed with Geyer's initial positive sequence (pairs of
   autocorrelations summed while positive) made monotone, and never below 1/log10(S). ρ̂_t is
   the multi-chain autocorrelation 1 − (W − mean autocovariance at lag t) / var⁺, where
   var⁺ = (N − 1)/N · W + B/N. Bulk ESS is the ESS of the rank-normalised split draws; tail ESS
   is the smaller ESS of the indicators I(draw ≤ q) for the 5% and 95% quantiles q.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MIN_DRAWS = 4  # below this split chains are too short to estimate anything (as ArviZ)
TAIL_PROB = 0.05  # tail ESS: the 5% and 95% quantiles
BLOM = 3 / 8  # the fractional offset of the rank-normal scores

Draws = npt.ArrayLike  # shape (chains, draws)
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Diagnostics:
    """R-hat, bulk ESS and tail ESS of one quantity's draws (NaN where undefined)."""

    rhat: float
    ess_bulk: float
    ess_tail: float
    chains: int
    draws: int  # per chain


def diagnose(draws: Draws) -> Diagnostics:
    """All three diagnostics of a (chains, draws) array."""
    x = _as_2d(draws)
    chains, n = x.shape
    if not _valid(x, min_chains=1):
        return Diagnostics(math.nan, math.nan, math.nan, chains, n)
    with _quiet():
        z = rank_normalise(split_chains(x))  # shared by the bulk R-hat and the bulk ESS
        return Diagnostics(
            rhat=_rhat_rank(x, z) if chains >= 2 else math.nan,
            ess_bulk=_ess(z),
            ess_tail=ess_tail(x),
            chains=chains,
            draws=n,
        )


def rhat(draws: Draws) -> float:
    """Rank-normalised split-R-hat: the larger of the bulk and the folded (tail) R-hat."""
    x = _as_2d(draws)
    if not _valid(x, min_chains=2):
        return math.nan
    with _quiet():
        return _rhat_rank(x, rank_normalise(split_chains(x)))


def ess_bulk(draws: Draws) -> float:
    """Bulk effective sample size: the ESS of the rank-normalised split chains."""
    x = _as_2d(draws)
    if not _valid(x, min_chains=1):
        return math.nan
    with _quiet():
        return _ess(rank_normalise(split_chains(x)))


def ess_tail(draws: Draws, prob: float = TAIL_PROB) -> float:
    """Tail effective sample size: the smaller of the quantile ESS at `prob` and 1 − `prob`."""
    x = _as_2d(draws)
    if not _valid(x, min_chains=1):
        return math.nan
    with _quiet():
        return min(ess_quantile(x, prob), ess_quantile(x, 1.0 - prob))


def ess_quantile(draws: Draws, prob: float) -> float:
    """The ESS of the `prob` quantile: the ESS of the split indicators I(draw ≤ quantile)."""
    x = _as_2d(draws)
    if not _valid(x, min_chains=1):
        return math.nan
    with _quiet():
        below = (x <= _quantile_type7(x, prob)).astype(np.float64)
        return _ess(split_chains(below))


def split_chains(draws: Draws) -> FloatArray:
    """Each chain's first and last halves as separate chains (an odd middle draw is dropped).

    Returns:
        Shape (2 · chains, draws // 2): the first halves of every chain, then the last halves.
    """
    x = _as_2d(draws)
    half = x.shape[1] // 2
    return np.vstack((x[:, :half], x[:, x.shape[1] - half :]))


def rank_normalise(draws: Draws) -> FloatArray:
    """Normal scores of the average ranks of all draws: Φ⁻¹((r − 3/8) / (S − 2·3/8 + 1))."""
    x = _as_2d(draws)
    values, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse.ravel(), minlength=values.size)
    # The draws tied at the i-th smallest value hold ranks first_i .. first_i + count_i − 1;
    # each gets their mean (SciPy's rankdata "average").
    first = np.cumsum(counts) - counts + 1
    average = first + (counts - 1) / 2.0
    scores = normal_quantile((average - BLOM) / (x.size - 2 * BLOM + 1))
    return scores[inverse].reshape(x.shape)


# Wichura (1988), "Algorithm AS 241: The percentage points of the normal distribution", Applied
# Statistics 37(3): the coefficients of its three rational approximations (PPND16, about 16
# significant digits), highest power first. Python's statistics.NormalDist.inv_cdf uses the same
# algorithm one number at a time; a rank normalisation needs it for every draw at once.
_CENTRAL_NUM = (
    2.5090809287301226727e3, 3.3430575583588128105e4, 6.7265770927008700853e4,
    4.5921953931549871457e4, 1.3731693765509461125e4, 1.9715909503065514427e3,
    1.3314166789178437745e2, 3.3871328727963666080e0,
)  # fmt: skip
_CENTRAL_DEN = (
    5.2264952788528545610e3, 2.8729085735721942674e4, 3.9307895800092710610e4,
    2.1213794301586595867e4, 5.3941960214247511077e3, 6.8718700749205790830e2,
    4.2313330701600911252e1, 1.0,
)  # fmt: skip
_NEAR_NUM = (
    7.7454501427834140764e-4, 2.2723844989269184583e-2, 2.4178072517745061177e-1,
    1.2704582524523683826e0, 3.6478483247632045046e0, 5.7694972214606914055e0,
    4.6303378461565452959e0, 1.4234371107496835773e0,
)  # fmt: skip
_NEAR_DEN = (
    1.0507500716444168432e-9, 5.4759380849953449460e-4, 1.5198666563616457197e-2,
    1.4810397642748007459e-1, 6.8976733498510000455e-1, 1.6763848301838038494e0,
    2.0531916266377588219e0, 1.0,
)  # fmt: skip
_FAR_NUM = (
    2.0103343992922881327e-7, 2.7115555687434875782e-5, 1.2426609473880784386e-3,
    2.6532189526576123093e-2, 2.9656057182850489123e-1, 1.7848265399172913358e0,
    5.4637849111641143699e0, 6.6579046435011037772e0,
)  # fmt: skip
_FAR_DEN = (
    2.0442631033899397856e-15, 1.4215117583164458887e-7, 1.8463183175100546818e-5,
    7.8686913114561325910e-4, 1.4875361290850614853e-2, 1.3692988092273580531e-1,
    5.9983220655588793769e-1, 1.0,
)  # fmt: skip


def normal_quantile(p: npt.ArrayLike) -> FloatArray:
    """Φ⁻¹(p), the standard normal quantile, element-wise for 0 < p < 1 (AS 241)."""
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    out = np.empty_like(p)
    central = np.abs(q) <= 0.425
    qc = q[central]
    r = 0.180625 - qc * qc
    out[central] = qc * np.polyval(_CENTRAL_NUM, r) / np.polyval(_CENTRAL_DEN, r)
    # Tails: a rational function of sqrt(−log(the smaller of p, 1 − p)), signed as q.
    qt = q[~central]
    s = np.sqrt(-np.log(np.where(qt <= 0.0, p[~central], 1.0 - p[~central])))
    near = s <= 5.0
    tail = np.where(
        near,
        np.polyval(_NEAR_NUM, s - 1.6) / np.polyval(_NEAR_DEN, s - 1.6),
        np.polyval(_FAR_NUM, s - 5.0) / np.polyval(_FAR_DEN, s - 5.0),
    )
    out[~central] = np.where(qt < 0.0, -tail, tail)
    return out


def _quiet() -> np.errstate:
    """No floating-point warnings: infinite or huge (±1e308) draws overflow to NaN or inf
    diagnostics, and those values say so, as for any other undefined diagnostic."""
    return np.errstate(all="ignore")


def _as_2d(draws: Draws) -> FloatArray:
    x = np.asarray(draws, dtype=np.float64)
    if x.ndim == 1:
        x = x[np.newaxis, :]  # one chain
    if x.ndim != 2:
        raise ValueError(f"draws must have shape (chains, draws), got {x.shape}")
    return x


def _valid(x: FloatArray, *, min_chains: int) -> bool:
    return x.shape[0] >= min_chains and x.shape[1] >= MIN_DRAWS and not np.isnan(x).any()


def _rhat_rank(x: FloatArray, z: FloatArray) -> float:
    """R-hat of valid draws `x` whose split chains rank-normalise to `z`."""
    split = split_chains(x)
    bulk = _rhat(z)
    tail = _rhat(rank_normalise(np.abs(split - np.median(split))))
    # `max` as ArviZ takes it: a NaN bulk R-hat stays NaN, while a NaN tail R-hat (every folded
    # split chain constant, e.g. draws of ±1 around a median of 0) leaves the bulk one standing.
    return tail if tail > bulk else bulk


def _rhat(x: FloatArray) -> float:
    """Split-R-hat of already split (and normalised) chains; 0/0 gives NaN, c/0 gives inf."""
    n = x.shape[1]
    between = n * np.var(np.mean(x, axis=1), ddof=1)  # B
    within = np.mean(np.var(x, axis=1, ddof=1))  # W
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sqrt((between / within + n - 1) / n))


def _fft_length(n: int) -> int:
    """The smallest 2^a·3^b·5^c >= n: a fast FFT size (the one SciPy's fftpack would pick, so
    the autocovariances round as ArviZ's do)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _autocovariance(x: FloatArray) -> FloatArray:
    """Each chain's autocovariance at every lag (biased, divided by n), by FFT."""
    n = x.shape[1]
    m = _fft_length(2 * n)  # zero padding to >= 2n - 1 makes the circular correlation linear
    centred = x - x.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=m, axis=1)
    spectrum *= np.conjugate(spectrum)
    acov: FloatArray = np.fft.irfft(spectrum, n=m, axis=1)[:, :n] / n
    return acov


def _ess(x: FloatArray) -> float:
    """ESS of (split) chains: S / τ with Geyer's initial monotone positive sequence."""
    chains, n = x.shape
    size = chains * n
    if np.max(x) - np.min(x) < np.finfo(np.float64).resolution:
        # Every draw equal: no autocorrelation to estimate; ArviZ counts every draw.
        return float(size)
    acov = _autocovariance(x)
    within = np.mean(acov[:, 0]) * n / (n - 1.0)  # W (the unbiased within-chain variance)
    var_plus = within * (n - 1.0) / n
    if chains > 1:
        var_plus += np.var(np.mean(x, axis=1), ddof=1)  # B / N

    # The multi-chain autocorrelation at every lag (only a prefix is used: Geyer's truncation).
    rho = (1.0 - (within - np.mean(acov, axis=0)) / var_plus).tolist()
    rho_hat = np.zeros(n)
    rho_hat[0] = even = 1.0
    rho_hat[1] = odd = rho[1]
    # Initial positive sequence: keep pairs (ρ_{t+1}, ρ_{t+2}) while the pair sums stay positive;
    # the first pair whose sum is negative ends it (a zero sum is kept but ends it too).
    t = 1
    while t < n - 3 and even + odd > 0.0:
        even, odd = rho[t + 1], rho[t + 2]
        if even + odd >= 0:
            rho_hat[t + 1], rho_hat[t + 2] = even, odd
        t += 2
    last = t - 2
    if even > 0:
        rho_hat[last + 1] = even  # the last even lag still helps when positive (Stan's choice)
    # Initial monotone sequence: no pair sum may exceed the previous one (noise at long lags).
    for t in range(1, last - 1, 2):
        if rho_hat[t + 1] + rho_hat[t + 2] > rho_hat[t - 1] + rho_hat[t]:
            rho_hat[t + 1] = rho_hat[t + 2] = (rho_hat[t - 1] + rho_hat[t]) / 2.0
    tau = -1.0 + 2.0 * np.sum(rho_hat[: last + 1]) + np.sum(rho_hat[last + 1 : last + 2])
    # Antithetic chains can make τ tiny; the floor keeps ESS <= S·log10(S).
    tau = max(tau, 1.0 / np.log10(size))
    if np.isnan(rho_hat).any():
        return math.nan
    return float(size / tau)


def _quantile_type7(x: FloatArray, prob: float) -> float:
    """The `prob` quantile of all draws, Hyndman and Fan's type 7 (R's default).

    Written as (1 − γ)·x₍ₖ₎ + γ·x₍ₖ₊₁₎ rather than x₍ₖ₎ + γ·(x₍ₖ₊₁₎ − x₍ₖ₎) (NumPy's form): with
    tied draws the two can differ in the last bit, and the quantile is compared with the draws
    themselves, so the form decides ties the way ArviZ (SciPy's mquantiles) does.
    """
    v = np.sort(x, axis=None)
    n = v.size
    if n == 1:
        return float(v[0])
    aleph = n * prob + (1.0 - prob)  # 1-based position (n − 1)·p + 1
    k = int(np.floor(min(max(aleph, 1.0), n - 1.0)))
    gamma = min(max(aleph - k, 0.0), 1.0)
    return float((1.0 - gamma) * v[k - 1] + gamma * v[k])


def summarise(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max) of the non-NaN values; NaNs when there are none."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    return float(np.min(v)), float(np.median(v)), float(np.max(v))


__all__ = [
    "MIN_DRAWS",
    "TAIL_PROB",
    "Diagnostics",
    "diagnose",
    "ess_bulk",
    "ess_quantile",
    "ess_tail",
    "normal_quantile",
    "rank_normalise",
    "split_chains",
    "summarise",
]
