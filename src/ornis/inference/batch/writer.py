"""Rows collected per shard and committed as a Parquet part file (with the shard's errors and feature maps).

The part is the commit: written to a temporary file and renamed on this machine, or sent whole in one PUT to object
storage (a store shows an object whole or not at all), always after the shard's errors and feature maps, so a part
that exists has them. Only in a local folder does the writer also mark the shard done in the manifest (under its
lock); in object storage the main process reconciles the manifest from the part objects at the start and the end."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ornis.data.datasets import read_plan_shard
from ornis.data.inputs import utf8_name
from ornis.inference.batch.job import BatchJob
from ornis.inference.batch.layout import PLAN, errors_path, features_path, part_name
from ornis.inference.batch.manifest import updating_manifest
from ornis.inference.batch.records import Batch, FailedSample, Outputs, Row
from ornis.inference.batch.runner import ModelRunner
from ornis.utils.storage import Location, committed, location, open_for_write, read_bytes, write_jsonl


class ShardWriter:
    """Collects rows per shard and commits a shard (errors, features, then the part file by rename) once all of its
    samples have come back from the DataLoader. ``expected`` maps each claimed shard to the sample indices handed out
    for it (the sampler's record); ``checkpoint_sha256`` goes into every part's metadata."""

    def __init__(
        self,
        out: Location | str,
        job: BatchJob,
        runner: ModelRunner,
        expected: Mapping[int, Sequence[int]],
        checkpoint_sha256: str,
    ) -> None:
        self.out = location(out)
        self.job = job
        self.runner = runner
        self.expected = expected
        self.rows: dict[int, list[Row]] = {}
        self.errors: dict[int, list[FailedSample]] = {}
        self.seen: dict[int, int] = {}
        self.metadata = {
            "ornis.model": job.model,
            "ornis.network": runner.net.name,
            "ornis.checkpoint_sha256": checkpoint_sha256,
            "ornis.task": job.task,
            "ornis.precision": runner.precision,
            "ornis.preprocessing": json.dumps(runner.preprocessing),
        }

    def add(self, batch: Batch, outputs: Outputs) -> int:
        """Take a batch's rows and failures; commit the shards this completes. Returns how many it committed."""
        for j, s in enumerate(batch.samples):
            self.rows.setdefault(s.shard, []).append(Row(s.index, s.key, s.width, s.height, outputs.row(j)))
        for failed in batch.failed:
            self.errors.setdefault(failed.shard, []).append(failed)
        touched = sorted({s.shard for s in batch.samples} | {f.shard for f in batch.failed})
        for s in [*batch.samples, *batch.failed]:
            self.seen[s.shard] = self.seen.get(s.shard, 0) + 1
        complete = [shard for shard in touched if self.seen[shard] == len(self.expected[shard])]
        for shard in complete:
            self.commit(shard)
        return len(complete)

    def commit(self, shard: int) -> None:
        """Write the shard: its errors, its feature maps, then its part file (the commit), then the manifest."""
        rows = self.rows.pop(shard, [])
        errors = self.errors.pop(shard, [])
        self.seen.pop(shard)
        part = self.out / part_name(shard)
        if part.exists():  # retrying errors: keep the rows already there, add the files that decode now
            rows = self._merge_existing(shard, part, rows)
        rows.sort(key=lambda r: r.index)
        errors.sort(key=lambda e: e.index)
        table = self._table(rows)
        if self.job.features:
            self._write_features(shard, rows)
        write_jsonl(errors_path(self.out, shard), [e.record() for e in errors])
        with committed(part) as tmp:
            pq.write_table(table, tmp)
        # The rename (or PUT) above is the commit: from here on the shard is done
        if isinstance(self.out, Path):
            with updating_manifest(self.out) as manifest:
                manifest.shards[shard].mark_done(rows=len(rows), errors=len(errors))

    def _write_features(self, shard: int, rows: list[Row]) -> None:
        assert self.job.features is not None
        feats = np.stack([r.outputs.features for r in rows]) if rows else np.zeros((0,), np.float32)
        dtype = np.float16 if self.job.embedding_dtype == "float16" else np.float32
        with committed(features_path(self.out, shard, self.job.features)) as tmp, open_for_write(tmp) as f:
            np.save(f, feats.astype(dtype))

    def _merge_existing(self, shard: int, part: Location, new_rows: list[Row]) -> list[Row]:
        plan = read_plan_shard(self.out / PLAN, shard)
        order = {utf8_name(item.key): i for i, item in enumerate(plan)}
        old = pq.read_table(_readable(part)).to_pylist()
        fresh = {utf8_name(r.key) for r in new_rows}
        feats = np.load(_readable(features_path(self.out, shard, self.job.features))) if self.job.features else None
        merged = list(new_rows)
        for j, row in enumerate(old):
            if row["path"] in fresh:
                continue
            if "embedding" in row:
                outputs = Outputs(embedding=np.asarray(row["embedding"], np.float32))
            else:
                probs, ids = np.asarray(row["probabilities"], np.float32), np.asarray(row["label_ids"], np.int64)
                outputs = Outputs(probabilities=probs, label_ids=ids)
            if feats is not None:
                outputs = Outputs(outputs.embedding, outputs.probabilities, outputs.label_ids, feats[j])
            index = order[row["path"]]
            merged.append(Row(index, plan[index].key, row["width"], row["height"], outputs))
        return merged

    def _table(self, rows: list[Row]) -> pa.Table:
        # Names that are not UTF-8 (surrogate escapes) as \xNN: Parquet strings must be valid UTF-8
        cols: dict[str, pa.Array] = {"path": pa.array([utf8_name(r.key) for r in rows], pa.string())}
        if self.job.task == "embed":
            cols["embedding"] = self._embedding_column(rows)
        else:
            cols.update(self._classes_columns(rows))
        cols["width"] = pa.array([r.width for r in rows], pa.int32())
        cols["height"] = pa.array([r.height for r in rows], pa.int32())
        return pa.table(cols).replace_schema_metadata(self.metadata)

    def _embedding_column(self, rows: list[Row]) -> pa.Array:
        dim = self.runner.net.embedding_size
        value_type = pa.float16() if self.job.embedding_dtype == "float16" else pa.float32()
        dtype = value_type.to_pandas_dtype()
        values = np.stack([r.outputs.embedding for r in rows]).astype(dtype) if rows else np.zeros((0, dim), dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type), dim)

    def _classes_columns(self, rows: list[Row]) -> dict[str, pa.Array]:
        k = min(self.job.top_k, self.runner.net.num_classes)
        ids = np.stack([r.outputs.label_ids for r in rows]).astype(np.int32) if rows else np.zeros((0, k), np.int32)
        probs = (
            np.stack([r.outputs.probabilities for r in rows]).astype(np.float32)
            if rows
            else np.zeros((0, k), np.float32)
        )
        labels = [self.runner.idx_to_class.get(int(i), str(int(i))) for i in ids.reshape(-1)]
        return {
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels, pa.string()), k),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), pa.float32()), k),
            "label_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), k),
        }


def _readable(where: Location) -> Path | io.BytesIO:
    """What ``pq.read_table`` / ``np.load`` read: the local path, or the object's bytes."""
    return where if isinstance(where, Path) else io.BytesIO(read_bytes(where))
