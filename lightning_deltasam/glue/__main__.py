"""The app's entry point: ``python -m lightning_deltasam.glue``, ``deltasam-train`` or ``python train.py``.

    python -m lightning_deltasam.glue task=sst2 optimizer=deltasam
    python -m lightning_deltasam.glue -m optimizer=adamw,sam,deltasam seed=1,2,3

The Hydra config ships inside the package (``lightning_deltasam/glue/conf/``), so an installed package runs the
app from any folder; results.json and logs go to the Hydra run dir (under the current folder). Needs the
``[app]`` extra: without it the entry points say so in one line (exit status 2) instead of an import traceback,
which is why this module imports nothing of the extra at module level.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("train")

#: The modules the app imports before it trains -> the package of the ``[app]`` extra that provides each.
APP_PACKAGES = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf (installed with hydra-core)",
    "torchmetrics": "torchmetrics",
    "transformers": "transformers",
}
APP_EXTRA = 'pip install "lightning-deltasam[app]"'
MISSING_PACKAGE_EXIT = 2  # as cli.USER_ERROR_EXIT, which cannot be imported without the extra


def missing_package(module: str) -> NoReturn:
    """One ``error:`` line naming the package that provides ``module`` and the extra to install; exit status 2."""
    package = APP_PACKAGES.get(module.split(".", 1)[0], module)
    print(
        f"error: the training app needs {package}, which is not installed; it comes with the app's extra: "
        f'{APP_EXTRA} (from a checkout: pip install -e ".[app]")',
        file=sys.stderr,
        flush=True,
    )
    sys.exit(MISSING_PACKAGE_EXIT)


def require_app_packages() -> None:
    """Exit with :func:`missing_package` when a module of :data:`APP_PACKAGES` cannot be imported."""
    for module in APP_PACKAGES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent that fails, or a module set to None in sys.modules
            found = False
        if not found:
            missing_package(module)


def main(cfg: DictConfig) -> float | None:
    """Run one training job; bad options and missing data exit with status 2 and one ``error:`` line
    (on stderr and in the run's train.log). :func:`cli_main` runs it under Hydra."""
    from lightning_deltasam.glue.cli import USER_ERROR_EXIT, quiet_third_party

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
    """Check that the ``[app]`` extra is installed and the command line's options (one ``error:`` line, exit
    status 2: the missing package and the extra; the closest valid options), then run :func:`main` under Hydra."""
    require_app_packages()
    try:
        import hydra

        from lightning_deltasam.glue.cli import CONF_DIR, check_command_line, register_resolvers
    except ModuleNotFoundError as err:  # a package of the extra that imports but is missing a dependency of its own
        if err.name is None or err.name.split(".", 1)[0] not in APP_PACKAGES:
            raise
        missing_package(err.name)
    register_resolvers()
    check_command_line()
    # a folder: checkout or wheel
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(main)()


if __name__ == "__main__":
    cli_main()
