"""Noise schedules alpha_t, time sampling (SPEC §3), the Gaussian-uniform duality (SPEC §5) and
its fitted polynomial approximations for the Duo++ curriculum modes (SPEC-2 §14).

alpha_t is the signal level of the discrete forward process: alpha_0 = 1, alpha_1 ~ 0.
The network is conditioned on sigma_t = -log alpha_t.
"""
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from atomic import atomic_write


class LogLinear:
    """alpha_t = 1 - (1 - eps) t."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1 - self.eps))


class Cosine:
    """alpha_t = 1 - cos(pi/2 (1 - (1 - eps) t))."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - torch.cos(math.pi / 2 * (1 - (1 - self.eps) * t))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -(math.pi / 2) * (1 - self.eps) * torch.sin(math.pi / 2 * (1 - (1 - self.eps) * t))


SCHEDULES = {'log-linear': LogLinear, 'cosine': Cosine}


def get_schedule(noise_config):
    if noise_config.type not in SCHEDULES:
        raise ValueError(f"noise.type={noise_config.type!r} is unknown; use one of {sorted(SCHEDULES)} "
                         f"(e.g. noise=log-linear)")
    return SCHEDULES[noise_config.type](float(noise_config.eps))


def stratified_times(batch_size: int, sampling_eps: float, rank: int = 0, world_size: int = 1,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Times (batch_size,) for this rank's slice of a stratified global batch (SPEC §3).

    The n = batch_size * world_size global times are t_k = eps + (1 - eps) ((u_k + k) / n mod 1)
    with u_k ~ U(0, 1); this rank holds k in [rank * batch_size, (rank + 1) * batch_size).
    Each rank draws its own u (its generator is seeded per rank), so the draws differ across ranks.
    """
    t = _stratified_unit(batch_size, rank, world_size, generator, device)
    return (sampling_eps + (1 - sampling_eps) * t).float()


def _stratified_unit(batch_size: int, rank: int, world_size: int, generator, device) -> torch.Tensor:
    """(batch_size,) float64 in [0, 1): this rank's (u_k + k) / n mod 1 of a global batch of n (SPEC §3)."""
    n = batch_size * world_size
    k = torch.arange(rank * batch_size, (rank + 1) * batch_size, device=device, dtype=torch.float64)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    return ((u + k) / n) % 1.0


def discrete_times(batch_size: int, T: int, rank: int = 0, world_size: int = 1,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Step indices i (batch_size,) int64 in 1..T for discrete-time training (SPEC-2 §12).

    i = floor(u T) + 1 with u stratified on [0, 1) as in stratified_times (the same per-rank slices)
    but without sampling_eps, so that every i, the final unmasking step i = 1 included, has
    probability 1/T (upstream's u >= 1e-3 never drew i = 1 for T = 1000).
    """
    if isinstance(T, bool) or int(T) != T or T < 1:
        raise ValueError(f'algo.T={T} must be an integer >= 1 for discrete-time training (e.g. algo.T=1000)')
    u = _stratified_unit(batch_size, rank, world_size, generator, device)
    # u < 1, but u T may round up to T for u within one ulp of 1
    return (u * T).floor().long().add_(1).clamp_(max=int(T))


def discrete_alphas(schedule, i: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_s) = (alpha(i / T), alpha((i - 1) / T)) for step indices i (any shape), float64.

    alpha_s is exactly 1 at i = 1 (alpha_0 = 1: the step to the clean data), whatever the schedule's
    rounding at t = 0. float64: 1 - alpha_t ~ 1/T and alpha_s - alpha_t ~ 1/T lose digits in float32.
    """
    i = i.to(torch.float64)
    alpha_s = schedule.alpha((i - 1) / T)
    return schedule.alpha(i / T), torch.where(i == 1, torch.ones_like(alpha_s), alpha_s)


# ---------------------------------------------------------------------------------------------
# The duality (SPEC §5). A Gaussian latent w = alpha~ x + sigma~ eps on a one-hot x, with
# alpha~^2 = sigmoid(-gamma) and sigma~^2 = sigmoid(gamma), has argmax(w) distributed as
# uniform-state noise with alpha = T(gamma) = (K I(gamma) - 1) / (K - 1), where
# I(gamma) = P(argmax w = x) = int phi(z) Phi(z + c)^(K-1) dz and c = alpha~ / sigma~ = e^(-gamma/2).
#
# T and T' are tabulated per K on a uniform gamma grid and interpolated by cubic Hermite
# polynomials through the exact values and derivatives (max error, measured for K = 2..200k:
# 5e-10 on T, 2e-7 on T'). The grid starts where T = 1 to float64 precision (c = e^5: the
# true class wins by > 100 standard deviations); beyond its end c < 5e-5 and T is linear in c
# to relative accuracy 1e-4, so T continues as T(gamma_hi) e^(-(gamma - gamma_hi) / 2).
#
# The integrals use the trapezoid rule on z in [-10, 10]: the integrands are analytic and decay
# like phi(z) at both ends, so the rule converges geometrically (h = 0.05 agrees with h = 0.01 to
# 1e-13 for K = 2..200k) and the truncation drops < phi(10) = 8e-23. Phi^(K-1) is evaluated as
# exp((K-1) log Phi), which neither underflows nor loses the 1 - Phi ~ 1/K tail for large K.
_GAMMA_LO, _GAMMA_HI, _GAMMA_STEP = -10.0, 20.0, 0.01
_GAMMA_NODES = round((_GAMMA_HI - _GAMMA_LO) / _GAMMA_STEP) + 1
_Z_LIM, _Z_STEP = 10.0, 0.05
_TABLE_VERSION = 1  # bump when the table's numerics change: old cache files are then rebuilt
_TABLES = {}  # (K, device, dtype) -> (2, _GAMMA_NODES) tensor of [T; T'] at the grid nodes


def _build_table(vocab_size: int) -> np.ndarray:
    """[T; dT/dgamma] at the grid nodes, (2, _GAMMA_NODES) float64, by quadrature over z."""
    K = vocab_size
    gamma = _GAMMA_LO + _GAMMA_STEP * torch.arange(_GAMMA_NODES, dtype=torch.float64)
    z = torch.linspace(-_Z_LIM, _Z_LIM, round(2 * _Z_LIM / _Z_STEP) + 1, dtype=torch.float64)
    c = torch.exp(-gamma / 2)[:, None]
    y = z + c  # (nodes, nz)
    log_pdf_z = -z ** 2 / 2 - math.log(2 * math.pi) / 2
    log_pdf_y = -y ** 2 / 2 - math.log(2 * math.pi) / 2
    log_cdf_y = torch.special.log_ndtr(y)
    # The integrands are ~1e-23 at the ends, so the trapezoid rule is a plain sum times h.
    integral = _Z_STEP * torch.exp(log_pdf_z + (K - 1) * log_cdf_y).sum(1)
    # dI/dc = (K-1) int phi(z) phi(z + c) Phi(z + c)^(K-2) dz; dc/dgamma = -c/2.
    dintegral_dc = _Z_STEP * (K - 1) * torch.exp(log_pdf_z + log_pdf_y + (K - 2) * log_cdf_y).sum(1)
    alpha = ((K * integral - 1) / (K - 1)).clamp(0, 1)
    dalpha = K / (K - 1) * dintegral_dc * (-c[:, 0] / 2)
    return torch.stack([alpha, dalpha]).numpy()


def _cache_dir() -> Path:
    """$DUO_CACHE_DIR, else .cache/duo beside this file."""
    return Path(os.environ.get('DUO_CACHE_DIR') or Path(__file__).resolve().parent / '.cache' / 'duo')


def _table_meta(vocab_size: int) -> np.ndarray:
    return np.array([_TABLE_VERSION, vocab_size, _GAMMA_LO, _GAMMA_HI, _GAMMA_STEP, _Z_LIM, _Z_STEP])


def _read_npz(path: Path, meta: np.ndarray, key: str, shape: tuple) -> np.ndarray | None:
    """Array `key` of the cache file, or None when the file is missing, corrupt or made for other settings."""
    try:
        # Our own handle: np.load leaks the one it opens when the zip directory is unreadable.
        with open(path, 'rb') as f:
            cached = np.load(f, allow_pickle=False)
            if not isinstance(cached, np.lib.npyio.NpzFile):  # a bare .npy array has no context manager
                raise ValueError('not an .npz archive')
            with cached:  # zip members carry a CRC-32, checked on read
                cached_meta, array = cached['meta'], cached[key]
    except (FileNotFoundError, NotADirectoryError):  # no cache yet (the write then says what is wrong)
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f'ignoring unreadable cache file {path} ({err}); rebuilding it')
        return None
    if not (np.array_equal(cached_meta, meta) and array.shape == shape
            and array.dtype == np.float64 and np.isfinite(array).all()):
        warnings.warn(f'ignoring cache file {path} made for other settings or damaged; rebuilding it')
        return None
    return array


def _write_npz(path: Path, meta: np.ndarray, key: str, array: np.ndarray, what: str) -> None:
    """Write atomically (temp file + rename), so concurrent ranks and crashes never leave a partial file."""
    try:
        atomic_write(path, lambda f: np.savez(f, meta=meta, **{key: array}))
    except OSError as err:
        warnings.warn(f'could not cache the {what} in {path.parent} ({err}); '
                      f'set DUO_CACHE_DIR to a writable directory (e.g. DUO_CACHE_DIR=/tmp/duo)')


def _table(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[T; T'] nodes (2, _GAMMA_NODES) on `device`: from memory, else the disk cache, else built."""
    # float64 keeps the table exact wherever it exists; the inputs are (B,) so its cost is nil.
    dtype = torch.float32 if device.type == 'mps' else torch.float64
    key = (vocab_size, device, dtype)
    if key not in _TABLES:
        host_key = (vocab_size, torch.device('cpu'), torch.float64)
        if host_key not in _TABLES:
            path = _cache_dir() / f'gaussian_to_uniform_K{vocab_size}.npz'
            meta = _table_meta(vocab_size)
            table = _read_npz(path, meta, 'table', (2, _GAMMA_NODES))
            if table is None:
                table = _build_table(vocab_size)
                _write_npz(path, meta, 'table', table, 'duality table')
            _TABLES[host_key] = torch.from_numpy(table)
        _TABLES[key] = _TABLES[host_key].to(device, dtype)
    return _TABLES[key]


def _interpolate(gamma: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T(gamma), T'(gamma)) elementwise from the node table, in the table's dtype."""
    x = (gamma - _GAMMA_LO) / _GAMMA_STEP
    i = torch.nan_to_num(x).floor().clamp(0, _GAMMA_NODES - 2)  # NaN gamma must not index out of range
    s = (x - i).clamp(0, 1)  # below the grid s = 0 gives T = 1, T' = 0; above it the tail takes over
    i = i.long()
    a0, a1 = table[0, i], table[0, i + 1]
    d0, d1 = table[1, i] * _GAMMA_STEP, table[1, i + 1] * _GAMMA_STEP
    c2 = 3 * (a1 - a0) - 2 * d0 - d1
    c3 = 2 * (a0 - a1) + d0 + d1
    alpha = a0 + s * (d0 + s * (c2 + s * c3))
    dalpha = (d0 + s * (2 * c2 + 3 * s * c3)) / _GAMMA_STEP
    tail = gamma > _GAMMA_HI
    decay = table[0, -1] * torch.exp((_GAMMA_HI - gamma.clamp(min=_GAMMA_HI)) / 2)
    return torch.where(tail, decay, alpha), torch.where(tail, -decay / 2, dalpha)


class _GaussianToUniformAlpha(torch.autograd.Function):
    """T(gamma) whose gradient is T'(gamma) from the same interpolant (no NaN from the tail branch)."""

    @staticmethod
    def forward(ctx, gamma, table):
        alpha, dalpha = _interpolate(gamma.to(table.dtype), table)
        ctx.save_for_backward(dalpha.to(gamma.dtype))
        return alpha.to(gamma.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_alpha):
        dalpha, = ctx.saved_tensors
        return grad_alpha * dalpha, None


def _check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise ValueError(f'vocab_size must be an integer >= 2 (e.g. vocab_size=50258), got {vocab_size!r}')
    return int(vocab_size)


def _as_float_tensor(gamma) -> torch.Tensor:
    gamma = torch.as_tensor(gamma)
    return gamma if gamma.is_floating_point() else gamma.to(torch.get_default_dtype())


def gaussian_to_uniform_alpha(gamma: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform-state alpha = T(gamma) of argmax(Gaussian latent), gamma = -log SNR, any shape.

    Differentiable (gradient T'(gamma)); accurate to 1e-6 for any vocab_size >= 2 and any gamma
    (T -> 1 as gamma -> -inf, T -> 0 as gamma -> +inf). Returned on gamma's device and dtype.
    The first call for a vocab_size builds its table (~0.1 s) and caches it on disk.
    """
    gamma = _as_float_tensor(gamma)
    return _GaussianToUniformAlpha.apply(gamma, _table(_check_vocab_size(vocab_size), gamma.device))


def gaussian_to_uniform_dalpha(gamma: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """dT/dgamma (<= 0) at gamma, any shape, on gamma's device and dtype."""
    gamma = _as_float_tensor(gamma)
    table = _table(_check_vocab_size(vocab_size), gamma.device)
    return _interpolate(gamma.to(table.dtype), table)[1].to(gamma.dtype)


def gamma_schedule(t: torch.Tensor, gamma_min: float, gamma_max: float) -> torch.Tensor:
    """gamma_t = gamma_min + t (gamma_max - gamma_min): -log SNR rises linearly in t."""
    return gamma_min + t * (gamma_max - gamma_min)


def gaussian_alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha~, sigma~) = (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma))): alpha~^2 + sigma~^2 = 1."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


class GaussianCurriculum:
    """The DUO curriculum's schedule: alpha_t = T(gamma_t), alpha'_t = T'(gamma_t)(gamma_max - gamma_min)."""

    def __init__(self, gamma_min: float, gamma_max: float, vocab_size: int):
        if not float(gamma_min) < float(gamma_max):
            raise ValueError(f'algo.gamma_min must be < algo.gamma_max (e.g. gamma_min=-3.55, '
                             f'gamma_max=-1.85), got {gamma_min} and {gamma_max}')
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.vocab_size = _check_vocab_size(vocab_size)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return gamma_schedule(t, self.gamma_min, self.gamma_max)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return gaussian_to_uniform_alpha(self.gamma(t), self.vocab_size)

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return gaussian_to_uniform_dalpha(self.gamma(t), self.vocab_size) * (self.gamma_max - self.gamma_min)


# ---------------------------------------------------------------------------------------------
# Fitted curriculum operator (Duo++, SPEC-2 §14): alpha_t is a polynomial in t fitted once by least
# squares to the exact T(gamma_t) on _POLY_POINTS equally spaced t in [0, 1]; alpha'_t is its derivative
# in t. The polynomial is held in the Chebyshev basis of x = 2t - 1 (a well-conditioned least-squares
# problem, and Clenshaw's recurrence evaluates it stably in any precision); it is the same polynomial
# a monomial fit would give. Cached per (K, gamma_min, gamma_max, degree, version): upstream keyed its
# file by the mode name only and silently reused stale coefficients (SPEC-2 §14 pitfall (e)).
_POLY_VERSION = 1  # bump when the fit changes: old cache files are then rebuilt
_POLY_POINTS = 100_000
EXACT_CURRICULUM_MODES = ('simple', 'efficient_cached', 'series')
POLY_CURRICULUM_MODES = ('poly3', 'poly5', 'poly7', 'poly9')
SIGMOID_CURRICULUM_MODES = ('sigmoid', 'sigmoid-edge-corrected')


def fit_curriculum_polynomial(gamma_min: float, gamma_max: float, vocab_size: int, degree: int) -> np.ndarray:
    """Chebyshev coefficients (degree + 1,) float64, in x = 2t - 1, of the least-squares polynomial fit
    of T(gamma_min + t (gamma_max - gamma_min)) on _POLY_POINTS equally spaced t in [0, 1]."""
    t = np.linspace(0.0, 1.0, _POLY_POINTS)
    target = gaussian_to_uniform_alpha(torch.from_numpy(gamma_schedule(t, gamma_min, gamma_max)), vocab_size)
    return np.polynomial.chebyshev.chebfit(2 * t - 1, target.numpy(), degree)


def _chebyshev(x: torch.Tensor, coefficients) -> torch.Tensor:
    """sum_i c_i T_i(x) elementwise, by Clenshaw's recurrence."""
    b1 = b2 = torch.zeros_like(x)
    for c in coefficients[:0:-1]:
        b1, b2 = 2 * x * b1 - b2 + c, b1
    return x * b1 - b2 + coefficients[0]


class PolyCurriculum:
    """The curriculum's schedule from a degree-`degree` polynomial fit in t of alpha_t = T(gamma_t) (modes poly3..poly9).

    alpha(t), dalpha(t) (d/dt of the same polynomial), elementwise on t in [0, 1], returned in t's dtype
    (evaluated in float64). Measured against the exact operator, K = 50258, degree 9 on the OWT range
    gamma in [-3.55, -1.85]: |delta alpha| <= 2.4e-5, |delta alpha'| / |alpha'| <= 1.3%.
    The fit (~0.2 s) is cached as an .npz under DUO_CACHE_DIR, keyed by every setting it depends on.
    """

    def __init__(self, gamma_min: float, gamma_max: float, vocab_size: int, degree: int = 9):
        exact = GaussianCurriculum(gamma_min, gamma_max, vocab_size)  # checks the arguments
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
            raise ValueError(f'the polynomial degree must be an integer >= 1 (algo.curriculum.mode=poly<degree>, '
                             f'e.g. algo.curriculum.mode=poly9), got {degree!r}')
        self.gamma_min, self.gamma_max, self.vocab_size = exact.gamma_min, exact.gamma_max, exact.vocab_size
        self.degree = int(degree)
        meta = np.array([_POLY_VERSION, _TABLE_VERSION, self.vocab_size, self.gamma_min, self.gamma_max,
                         self.degree, _POLY_POINTS], dtype=np.float64)
        path = _cache_dir() / (f'curriculum_poly{self.degree}_K{self.vocab_size}_gamma{self.gamma_min!r}'
                               f'_{self.gamma_max!r}_v{_POLY_VERSION}.npz')
        coefficients = _read_npz(path, meta, 'coefficients', (self.degree + 1,))
        if coefficients is None:
            coefficients = fit_curriculum_polynomial(self.gamma_min, self.gamma_max, self.vocab_size, self.degree)
            _write_npz(path, meta, 'coefficients', coefficients, 'curriculum polynomial')
        self.coefficients = coefficients  # Chebyshev, in x = 2t - 1
        self._alpha = tuple(coefficients.tolist())
        self._dalpha = tuple((2 * np.polynomial.chebyshev.chebder(coefficients)).tolist())  # dx/dt = 2

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return gamma_schedule(t, self.gamma_min, self.gamma_max)

    def _evaluate(self, t: torch.Tensor, coefficients) -> torch.Tensor:
        t = _as_float_tensor(t)
        dtype = torch.float32 if t.device.type == 'mps' else torch.float64
        return _chebyshev(2 * t.to(dtype) - 1, coefficients).to(t.dtype)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._evaluate(t, self._alpha)

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._evaluate(t, self._dalpha)


def curriculum_operator(mode: str, gamma_min: float, gamma_max: float, vocab_size: int):
    """The (alpha_t, alpha'_t) source of an upstream `algo.curriculum.mode` (SPEC-2 §14).

    simple / efficient_cached / series: the exact GaussianCurriculum (upstream's pickled table and
    150-term series approximate the same T); poly3 / poly5 / poly7 / poly9: PolyCurriculum of that degree.
    The sigmoid modes are refused: upstream's alpha' lacks a factor 2 (pitfall (f)) and even done right
    the 4-parameter sigmoid is far off the operator (OWT range: |delta alpha| 8e-3, |delta alpha'| 32%).
    """
    check_curriculum_mode(mode)
    if mode in EXACT_CURRICULUM_MODES:
        return GaussianCurriculum(gamma_min, gamma_max, vocab_size)
    return PolyCurriculum(gamma_min, gamma_max, vocab_size, degree=int(mode[len('poly'):]))


def check_curriculum_mode(mode) -> None:
    """ValueError (one line with an example) unless `mode` is one of the supported curriculum modes."""
    if mode in EXACT_CURRICULUM_MODES + POLY_CURRICULUM_MODES:
        return
    if mode in SIGMOID_CURRICULUM_MODES:
        raise ValueError(f'algo.curriculum.mode={mode} is not supported: a sigmoid fit misses the operator by up to '
                         f'32% in alpha\' (upstream also drops a factor 2); use algo.curriculum.mode=poly9')
    raise ValueError(f'algo.curriculum.mode={mode!r} is unknown: use one of '
                     f'{", ".join(EXACT_CURRICULUM_MODES + POLY_CURRICULUM_MODES)} (e.g. algo.curriculum.mode=poly9)')
