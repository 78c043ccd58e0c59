"""ldmscale.data: LAION-layout WebDataset shards -> filtered, decoded, resized, tokenized micro-batches,
resumable exactly.

Distribution: each epoch the shard list is shuffled with (seed, epoch), split by rank, then by loader
worker. Every worker yields exactly `batches_per_worker` batches per epoch, cycling over its shards as
often as needed, so every rank yields the same number of batches whatever the shard sizes (no rank
waits in a collective at an epoch's end).

Exact resume: inside a worker the stream of undecoded samples (shards -> filter -> seeded shuffle) is a
pure function of (seed, epoch, rank, worker role). The main process records, for every worker role,
how many of those samples it consumed; a resumed worker replays its stream and skips them before
decoding (cheap). The DataLoader takes workers round-robin, so after B batches a resumed loader maps
its worker j onto role (B + j) % workers and yields the very next batch the interrupted run would have.
"""

from ldmscale.data.decode import decode_image, normalize_pixels, stack_uint8, to_tensor
from ldmscale.data.filters import IMAGE_EXTS, reject_reason
from ldmscale.data.loader import ResumableLoader
from ldmscale.data.shardlist import check_shards_reachable, count_samples, expand_shard_urls
from ldmscale.data.storage import StorageError
from ldmscale.data.stream import DataPosition, ShardStream, shards_for

__all__ = [
    "IMAGE_EXTS", "DataPosition", "ResumableLoader", "ShardStream", "StorageError", "check_shards_reachable",
    "count_samples", "decode_image", "expand_shard_urls", "normalize_pixels", "reject_reason", "shards_for",
    "stack_uint8", "to_tensor",
]
