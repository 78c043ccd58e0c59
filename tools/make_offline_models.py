"""Write tokenizer/, text_encoder/ and vae/ folders that from_pretrained loads offline.

    python tools/make_offline_models.py --shards DIR_OR_GLOB --out DIR [--max-length 16] [--vae tiny]
    python tools/make_offline_models.py --captions captions.txt --out DIR

The tokenizer is a byte-level BPE trained on the shards' captions; the models are small and random-init.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
from ldmscale.models.offline import VAE_PRESETS, captions_from_shards, write_offline_models


def shard_paths(spec: str) -> list[Path]:
    """A folder of .tar shards, a single tar, or a glob such as 'data/train/*.tar'."""
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return sorted(Path(p) for p in glob.glob(spec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="shard folder or glob; captions come from the .txt members")
    source.add_argument("--captions", type=Path, help="text file, one caption per line")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-length", type=int, default=16, help="tokenizer model_max_length")
    parser.add_argument("--vae", default="tiny", choices=sorted(VAE_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.shards:
        tars = shard_paths(args.shards)
        if not tars:
            print(f"no shards match {args.shards}", file=sys.stderr)
            return 1
        captions = list(captions_from_shards(tars))
    else:
        captions = [line for line in args.captions.read_text(encoding="utf-8").splitlines() if line.strip()]
    paths = write_offline_models(
        captions, args.out, max_length=args.max_length, vae_preset=args.vae, seed=args.seed
    )
    print(f"trained tokenizer on {len(captions)} captions")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
