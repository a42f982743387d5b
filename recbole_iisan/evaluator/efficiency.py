"""TPME, the efficiency score of IISAN (Fu et al., SIGIR 2024, arXiv:2404.02059, Eqs. (6)-(10)):
training time, trainable parameters and memory, each min-max normalised over the compared methods,
weighted 0.45 / 0.10 / 0.45. Lower is better; the score is relative to the compared set."""
from __future__ import annotations

TPME_WEIGHTS = (0.45, 0.10, 0.45)


def _minmax(xs):
    lo, hi = min(xs), max(xs)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]


def tpme(times, params, memory, weights=TPME_WEIGHTS):
    """TPME per method (SIGIR'24 Eqs. 6-10): min-max normalise each quantity over the compared
    methods, then ``0.45 t + 0.10 p + 0.45 m``. Lower is better; a quantity with no spread adds 0."""
    a1, a2, a3 = weights
    return [a1 * t + a2 * p + a3 * m for t, p, m in zip(_minmax(times), _minmax(params), _minmax(memory))]
