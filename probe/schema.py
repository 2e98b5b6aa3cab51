"""Column names, dtypes and the on-disk layout of a run, shared by writer, reader and dashboard.

Layout of one run folder::

    <run>/run.json                                   metadata, see ``RunMeta`` fields below
    <run>/filters/rank=<r>/part-<k>.parquet          one row per (step, layer, filter)
    <run>/scalars/rank=<r>/part-<k>.parquet          one row per recorded step

Parts are written as ``.part-<k>.parquet.tmp`` and renamed when complete, so a reader that only
globs ``part-*.parquet`` never reads a partial file.
"""

FORMAT_VERSION = 1

RUN_FILE = "run.json"
FILTERS_DIR = "filters"
SCALARS_DIR = "scalars"
PART_GLOB = "part-*.parquet"

STATUS_RUNNING = "running"
STATUS_FINISHED = "finished"
STATUS_FAILED = "failed"
# Shown by readers, never written: a running run whose heartbeat is older than this.
STATUS_INTERRUPTED = "interrupted"
HEARTBEAT_STALE_S = 120.0

# Key columns of the filters table, in order. `layer` is dictionary-encoded text.
FILTER_KEYS = ("step", "layer", "filter")

# Per-filter metrics, all float32 on disk except `active_samples` (int32).
METRICS = (
    "gain",
    "out_rms",
    "out_mean",
    "sparsity",
    "active_samples",
    "effective_batch",
    "grad_norm",
    "weight_norm",
    "update_ratio",
)
INTEGER_METRICS = ("active_samples",)

# Scalars every step row carries; user scalars (loss, lr, accuracy, ...) are added as float64.
SCALAR_KEYS = ("step", "wall_time", "batch_size", "samples_per_s")
