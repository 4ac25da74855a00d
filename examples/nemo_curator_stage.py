"""Recipe: the memorization score as a NeMo Curator stage over `DocumentBatch` (NeMo Curator >= 1.4, on Ray).

An optional recipe, not part of auditor's core (which never imports NeMo Curator). It wraps
`auditor.ray_data.MemorizationScorer`, so the stage scores exactly as `auditor audit` does and adds the same
columns: memorization_score, memorization_flag, memorization_status. nemo-curator 1.4.0 asks for
`ray[data,default]>=2.57`, so it installs beside auditor's Ray without pinning it lower.

    pip install nemo-curator
    python examples/nemo_curator_stage.py captions.parquet --model "$(auditor toy-model path)" --threshold 0.35

In a Curator pipeline of your own, add the stage after your reader and before your filters or writer:

    pipeline.add_stage(MemorizationScoreStage(model="s3://bucket/models/sd15", caption_column="text",
                                              threshold=0.35).with_(resources=Resources(cpus=1.0, gpus=1.0)))
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from nemo_curator.backends.ray_data import RayDataExecutor
from nemo_curator.pipeline import Pipeline
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from auditor import schema
from auditor.ray_data import OUTPUT_COLUMNS, MemorizationScorer


@dataclass
class MemorizationScoreStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Adds memorization_score / memorization_flag / memorization_status to every document; other columns stay.

    The model loads once per worker (setup); each DocumentBatch is scored in batches of `score_batch_size`
    captions. Bad rows (null, empty, not a string) get a status and no score. Give it a GPU with
    `.with_(resources=Resources(gpus=1.0))` on a GPU cluster. No resume of its own: that is the pipeline's.
    """

    model: str
    caption_column: str = "caption"
    threshold: float | None = None
    score_batch_size: int = 32
    options: dict[str, Any] = field(
        default_factory=dict
    )  # more MemorizationScorer keywords (seed, dtype, ...)
    name: str = "memorization_score"
    resources: Resources = field(default_factory=lambda: Resources(cpus=1.0))

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.caption_column]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], list(OUTPUT_COLUMNS)

    def setup(self, worker_metadata: Any = None) -> None:
        self._scorer = MemorizationScorer(
            model=self.model,
            caption_column=self.caption_column,
            threshold=self.threshold,
            batch_size=self.score_batch_size,
            **self.options,
        )

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        table = batch.to_pyarrow()
        scored = [
            self._scorer(table.slice(start, self.score_batch_size))
            for start in range(0, table.num_rows, self.score_batch_size)
        ]
        return DocumentBatch(
            dataset_name=batch.dataset_name,
            data=pa.concat_tables(scored) if scored else self._scorer(table),
            _metadata=batch._metadata,
            _stage_perf=batch._stage_perf,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", help="parquet files with a caption column")
    parser.add_argument("--model", required=True, help="diffusers SD folder, hub id or s3:// URI")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--threshold", type=float, default=None)
    args = parser.parse_args()
    tasks = [DocumentBatch(dataset_name=path, data=pq.read_table(path)) for path in args.inputs]
    stage = MemorizationScoreStage(
        model=args.model, caption_column=args.caption_column, threshold=args.threshold
    )
    results = Pipeline(name="memorization", stages=[stage]).run(RayDataExecutor(), initial_tasks=tasks)
    for task in results or []:
        table = task.to_pyarrow()
        flagged = sum(bool(f) for f in table.column(schema.MEMORIZATION_FLAG).to_pylist())
        statuses = Counter(table.column(schema.MEMORIZATION_STATUS).to_pylist())
        print(f"{task.dataset_name}: {table.num_rows} rows, {flagged} flagged, statuses {dict(statuses)}")


if __name__ == "__main__":
    main()
