"""The app's entry point: ``python -m lightning_deltasam.glue``, ``deltasam-train`` or ``python train.py``.

    python -m lightning_deltasam.glue task=sst2 optimizer=deltasam
    python -m lightning_deltasam.glue -m optimizer=adamw,sam,deltasam seed=1,2,3

The Hydra config ships inside the package (``lightning_deltasam/glue/conf/``), so an installed package runs the
app from any folder; results.json and logs go to the Hydra run dir (under the current folder). Needs the
``[app]`` extra.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from lightning_deltasam.glue.cli import (
    CONF_DIR,
    USER_ERROR_EXIT,
    check_command_line,
    quiet_third_party,
    register_resolvers,
)

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")  # a folder: checkout or wheel
def main(cfg: DictConfig) -> float | None:
    """Run one training job; bad options and missing data exit with status 2 and one ``error:`` line
    (on stderr and in the run's train.log)."""
    quiet_third_party()
    from lightning_deltasam.glue.app import USER_ERRORS, describe_error, run  # here: config errors report fast

    try:
        results = run(cfg)
    except USER_ERRORS as err:
        line = f"error: {describe_error(err)}"
        log.error(line)
        print(line, file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except BaseException:
        log.exception("training stopped")
        raise
    return results.get(results["main_metric"])  # the value a Hydra sweeper would optimize


def cli_main() -> None:
    """Check the command line's options (one ``error:`` line naming the closest valid ones, exit status 2), then
    run :func:`main` under Hydra."""
    register_resolvers()
    check_command_line()
    main()


if __name__ == "__main__":
    cli_main()
