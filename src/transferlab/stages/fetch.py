"""fetch: data.url (or the mirror) -> data/raw/, and data/fetch.json saying what was fetched."""
import os

from transferlab.fetching import MIRROR_ENV, fetch
from transferlab.params import load_params
from transferlab.stages import run_stage

RAW_DIR = "data/raw"
RECORD = "data/fetch.json"


def main() -> None:
    params = load_params(check_model=False)  # builds no model: starts without torchvision
    info = fetch(params.data.url, RAW_DIR, params.data.sha256, os.environ.get(MIRROR_ENV), RECORD)
    print(f"fetched {info['files']} files from {info['source']} into {RAW_DIR} (sha256 {info['sha256']})")


if __name__ == "__main__":
    run_stage("fetch", main, [RAW_DIR + "/", RECORD])
