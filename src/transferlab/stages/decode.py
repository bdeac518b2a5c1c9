"""decode: every image of train, val and test decoded once, on all cores, into the memory-mapped
store that the trainers and evaluate share (store.py); data/decode.json names it.

The store is derived data under the cache folder, not a DVC output: if it is deleted, the next
stage that needs it rebuilds it. An interrupted decode continues where it stopped.
"""
import time
from pathlib import Path

from transferlab.files import write_json
from transferlab.images import SPLITS, read_split
from transferlab.models import preprocess_for
from transferlab.params import load_params
from transferlab.stages import cache_dir, require_inputs, run_stage
from transferlab.store import open_store

SPLIT_DIR = Path("data/split")
RECORD = "data/decode.json"


def main() -> None:
    require_inputs({f"{SPLIT_DIR}/{name}.csv": "split" for name in SPLITS})
    params = load_params()
    pre = preprocess_for(params.model, params.weights)
    min_side = pre.resize_size
    samples = [s for name in SPLITS for s in read_split(SPLIT_DIR / f"{name}.csv")]
    start = time.perf_counter()
    store = open_store(samples, min_side, cache_dir(), resample=pre.interpolation)
    write_json(RECORD, {"store": store.folder.name, "images": len(store), "min_side": min_side,
                        "interpolation": pre.interpolation, "bytes": store.nbytes})
    print(f"{len(store)} images decoded to a {min_side}-pixel short side in {store.folder} "
          f"({store.nbytes / 1e6:.0f} MB, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    run_stage("decode", main, [RECORD])
