"""Train a GLUE classifier with AdamW / SAM / ASAM / delta-SAM.

    python train.py task=sst2 optimizer=deltasam
    python train.py -m optimizer=adamw,sam,deltasam seed=1,2,3

Configuration lives in conf/ (Hydra); results.json and logs go to the Hydra run dir.
"""

from __future__ import annotations

import sys
from typing import Optional

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Run one training job; bad options and missing data exit with status 2 and one ``error:`` line."""
    from lightning_deltasam.glue.app import USER_ERRORS, describe_error, run  # here: config errors report fast

    try:
        results = run(cfg)
    except USER_ERRORS as err:
        print(f"error: {describe_error(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    return results.get(results["main_metric"])  # the value a Hydra sweeper would optimize


if __name__ == "__main__":
    main()
