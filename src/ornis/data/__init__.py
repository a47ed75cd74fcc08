"""The input layer every command reads images through (``ornis embed`` / ``classify``, ``ornis train``, the
evaluations), so the same folder, list or shard yields the same samples whichever command reads it.

- :mod:`~ornis.data.decode`: bytes or a path -> an RGB image or a reason why not; ``IMAGE_EXTENSIONS``, the one set
  of extensions that makes a file or a tar member an image.
- :mod:`~ornis.data.folders`: walking a folder (recursive, sorted, hidden names left out).
- :mod:`~ornis.data.tar`: webdataset shards (key = member path up to the first dot of its file name; the first
  image of a key is the sample; ``.cls`` labels), reading a member by offset.
- :mod:`~ornis.data.inputs`: what the batch commands' arguments name (folders, images, globs, txt/csv/parquet
  lists, tars).
- :mod:`~ornis.data.plan` and :mod:`~ornis.data.datasets`: the batch runner's shards and its per-sample dataset.
- :mod:`~ornis.data.sources`, :mod:`~ornis.data.keys` and :mod:`~ornis.data.augment`: the training sources
  (folder, shards), the sample keys and the seeded augmentations (used through ``ornis.train.data``).
- :mod:`~ornis.data.transforms`: the inference preprocessing.
"""
