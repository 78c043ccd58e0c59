"""ldmscale.data: LAION-layout WebDataset shards -> filtered, decoded, resized, tokenized micro-batches,
resumable exactly.

Sources: data.shards, or a weighted mixture (data.sources: sources.py); which source fills each sample slot
of an epoch is a pure function of (seed, epoch, slot) (mixture.py), whatever the world size.

Distribution: each epoch the shard list (of each source) is shuffled with (seed, epoch), split by rank, then by
loader worker role. A rank gives `samples_per_epoch // global_batch` steps' worth of micro-batches per epoch,
cycling over its shards as often as needed, so every rank yields the same number of batches whatever the
shard sizes (no rank waits in a collective at an epoch's end).

Exact, cheap resume: a worker's undecoded stream is a pure function of (seed, epoch, source split) and is
shuffled in blocks whose state is a shard index and an offset (stream.py). Every batch carries its role's
position; each rank saves its own (position.py), and a resume reopens only the shards the current blocks
span. On another number of ranks or workers the rest of the epoch is re-divided, each batch given once.
"""

from ldmscale.data.decode import decode_image, normalize_pixels, stack_uint8, to_tensor
from ldmscale.data.filters import IMAGE_EXTS, reject_reason
from ldmscale.data.loader import ResumableLoader
from ldmscale.data.position import DataPosition, PositionError
from ldmscale.data.preflight import DataPlan, count_samples, shared_plan
from ldmscale.data.shardlist import check_shards_reachable, expand_shard_urls
from ldmscale.data.storage import StorageError
from ldmscale.data.stream import SourceStream, shards_for, source_shards

__all__ = [
    "IMAGE_EXTS", "DataPlan", "DataPosition", "PositionError", "ResumableLoader", "SourceStream", "StorageError",
    "check_shards_reachable", "count_samples", "decode_image", "expand_shard_urls", "normalize_pixels",
    "reject_reason", "shared_plan", "shards_for", "source_shards", "stack_uint8", "to_tensor",
]
