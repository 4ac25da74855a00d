"""The one tolerance for scores of the same captions computed in another batch, process or load of the same weights.

Such scores agree to float32 rounding, not bit for bit: CPU kernels pick their summation order from the batch shape,
the instruction set (AVX2, AVX512) and how the weights sit in memory, so two audits of one corpus can differ in the
last bits (seen: 1.05e-6 relative on an Intel Xeon between the audit's batches and a standalone scorer's). README
promises 1e-5 relative in fp32; atol covers scores near 0 (the empty caption scores its uncond against itself).
Compare bit for bit only where the same scorer scores the same batch twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CROSS_BATCH_RTOL = 1e-5
CROSS_BATCH_ATOL = 1e-6


def assert_scores_close(actual: Any, expected: Any, err_msg: str = "") -> None:
    """Scores (any array-like of floats) equal within the cross-batch tolerance."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=CROSS_BATCH_RTOL,
        atol=CROSS_BATCH_ATOL,
        err_msg=err_msg,
    )
