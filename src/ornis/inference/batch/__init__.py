"""Batch embedding and classification of image collections into Parquet, resumable and shardable.

::

    from ornis.inference.batch import embed, classify

    summary = embed(["photos/", "more/*.jpg", "shards/*.tar"], model="hieradet_small_sam2_1", out="emb/")
    summary = classify(["list.csv"], model="flexivit_reg1_s16_rms_ls_dino-v2-il-all", top_k=5, out="cls/")

The output folder holds

- ``part-NNNNN.parquet``, one per shard, one row an image: ``path`` (or ``<tar>:<key>``), then ``embedding``
  (fixed-size list of float32, or float16 with ``embedding_dtype="float16"``) or ``labels`` and ``probabilities``
  (the top k, best first), then ``width`` and ``height`` of the decoded image. The file metadata holds the model
  name, the checkpoint's sha256, the task and the preprocessing (keys ``ornis.*``). Rows are in input order.
- ``_manifest.json``: the job, the shards and their status (rewritten atomically, under a lock).
- ``_errors.jsonl``: one line a file that was skipped, ``{"path", "reason", "shard", "index"}`` (special files,
  files over ``max_bytes`` and folders named like images among them, unread), and one line an input that could not
  be read while planning (a tar cut short, a folder that cannot be listed; ``shard`` null).
- ``_plan.parquet`` (the samples of each shard), ``_errors/`` (each shard's errors), ``_features/``
  (``features=STAGE``: ``part-NNNNN.STAGE.npy``, rows as in the part file) and ``_claims/``.

The leading underscores keep these out of ``pandas.read_parquet(out)`` / ``pyarrow.dataset``, which then read
exactly the rows.

The unit of work is a shard (a chunk of ``shard_size`` loose files, or one tar): it is written to a temporary file
and renamed into ``part-NNNNN.parquet``, which is the commit. Running the same call again skips the shards that
have a part file and does the rest, so a killed run (even SIGKILL) finishes with every good image exactly once.
``retry_errors=True`` re-tries only the files that failed and merges the ones that now decode into their part.

A file name that is not UTF-8 is kept as ``os.fsdecode`` makes it (surrogate escapes) in the plan and the errors
file, so it maps back to the file; the Parquet ``path`` column, which must be UTF-8, shows such bytes as ``\\xNN``
(``ornis.data.inputs.utf8_name``). Inputs are compared as the files they name (``./data/`` and ``data`` are one job,
one file under two spellings is one row). A folder whose run wrote no part file (a run that failed to load its model)
blocks nothing: the next run, whatever its job, starts it afresh.

Two runs started into one folder share the work: a run that finds another one working there (``lease``) joins its
claim attempt instead of starting a new one, and one with another job is refused with a message naming the first.

Inputs and the output folder may be in object storage: any fsspec URL (``s3://bucket/photos/``, ``gs://...``; see
``ornis.utils.storage``), local paths staying as they are. A folder is a prefix listing, a tar is read by ranged
reads (never copied whole), and the output works the same with a PUT for a rename: a part object, written whole after
its shard's errors object, is the commit; the plan, the manifest and ``_errors.jsonl`` are written whole by the run's
main process, the manifest reconciled from the listed parts at the start and the end (workers never rewrite it). There
is no lock, lease or claim in a store: one process (or Ray workers handed their ``shard_ids``) writes into such a
folder, ``torchrun`` ranks are refused there, and two runs started into it at once are not detected.

Under ``torchrun`` every rank runs the same call: rank 0 resolves and hashes the checkpoint and plans, then each rank
claims shards one at a time through an exclusive-create file per shard (``_claims/<attempt>/NNNNN``), so fast ranks
take more shards; the process group (gloo) only carries barriers and the totals. ``ornis.inference.ray_runner`` runs
the same worker as Ray tasks.

Preprocessing defaults to the checkpoint's ``classification_transform`` on ``open_rgb``'s RGB image
(``ornis.inference.preprocess``), so rows equal ``infer_image``'s output; resizing runs in the DataLoader workers and
the uint8 -> float scaling and normalisation on the model's device (a quarter of the bytes through shared and pinned
memory).

The modules, in the order a run meets them: ``job`` (what to do), ``model`` (the checkpoint, resolved once),
``output``, ``manifest`` and ``lease`` (the folder, and who works in it now), ``sampler`` (claiming shards),
``worker`` (the loop), ``runner`` and ``device_decode`` (the model on its device), ``writer`` (the part files),
``records`` (the typed rows and batches), ``run`` (``embed`` / ``classify`` / ``run_batch``).
"""

from ornis.inference.batch.job import PRECISIONS, TASKS, BatchJob, BatchSummary, WorkerStats, make_job
from ornis.inference.batch.layout import ERRORS, MANIFEST, PLAN, part_name
from ornis.inference.batch.manifest import MANIFEST_FORMAT, Manifest, OutputFolderError, ShardEntry, read_manifest
from ornis.inference.batch.model import ResolvedModel, load_model, resolve_model
from ornis.inference.batch.output import PreparedOutput, finalize_output, pending_shards, prepare_output, read_errors
from ornis.inference.batch.records import Batch, FailedSample, Outputs, Row, SampleRef
from ornis.inference.batch.run import classify, embed, run_batch
from ornis.inference.batch.runner import ModelRunner
from ornis.inference.batch.sampler import ClaimingBatchSampler
from ornis.inference.batch.worker import BatchProgress, BatchWorker, run_worker
from ornis.inference.batch.writer import ShardWriter
from ornis.inference.preprocess import split_transform
from ornis.utils.distributed import default_num_workers

__all__ = [
    "ERRORS",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "PLAN",
    "PRECISIONS",
    "TASKS",
    "Batch",
    "BatchJob",
    "BatchProgress",
    "BatchSummary",
    "BatchWorker",
    "ClaimingBatchSampler",
    "FailedSample",
    "Manifest",
    "ModelRunner",
    "Outputs",
    "OutputFolderError",
    "PreparedOutput",
    "ResolvedModel",
    "Row",
    "SampleRef",
    "ShardEntry",
    "ShardWriter",
    "WorkerStats",
    "classify",
    "default_num_workers",
    "embed",
    "finalize_output",
    "load_model",
    "make_job",
    "part_name",
    "pending_shards",
    "prepare_output",
    "read_errors",
    "read_manifest",
    "resolve_model",
    "run_batch",
    "run_worker",
    "split_transform",
]
