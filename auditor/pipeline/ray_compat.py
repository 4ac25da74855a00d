"""`map_batches` keywords that differ between the Ray versions pyproject.toml accepts (2.50 and later). Imports ray.

KubeRay images pin a Ray release for a long time, so the audit runs on the oldest accepted one too (the lower-bounds
check in .ci/lower_bounds.sh audits on it); each difference is one function here, not a raised bound.
"""

from __future__ import annotations

import inspect
from typing import Any

import ray.data

# Ray 2.51 made TaskPoolStrategy public and deprecated `concurrency` for `compute=<strategy>`; 2.50 logs "The
# argument compute is deprecated in Ray 2.9" for a strategy and reads the pool size from `concurrency`.
POOL_STRATEGIES_PUBLIC = hasattr(ray.data, "TaskPoolStrategy")
# Ray 2.52 added map_batches(udf_modifying_row_count=...); before, the keyword would go on as a Ray remote argument
# and fail the actor's options.
ROW_COUNT_HINT = "udf_modifying_row_count" in inspect.signature(ray.data.Dataset.map_batches).parameters


def actor_pool(size: int) -> dict[str, Any]:
    """map_batches keywords for a pool of `size` actors (the callable class is the map's function)."""
    return (
        {"compute": ray.data.ActorPoolStrategy(size=size)}
        if POOL_STRATEGIES_PUBLIC
        else {"concurrency": size}
    )


def task_pool(size: int) -> dict[str, Any]:
    """map_batches keywords for at most `size` tasks of a plain function at a time."""
    return (
        {"compute": ray.data.TaskPoolStrategy(size=size)} if POOL_STRATEGIES_PUBLIC else {"concurrency": size}
    )


def keeps_row_count() -> dict[str, Any]:
    """map_batches keywords that say the function returns as many rows as it gets (lets Ray plan around it)."""
    return {"udf_modifying_row_count": False} if ROW_COUNT_HINT else {}
