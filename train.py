"""Train a GLUE classifier with AdamW / SAM / ASAM / delta-SAM (from a source checkout).

    python train.py task=sst2 optimizer=deltasam
    python train.py -m optimizer=adamw,sam,deltasam seed=1,2,3

The same as ``python -m lightning_deltasam.glue`` (or ``deltasam-train``) once the package is installed with
its ``[app]`` extra. The configuration is lightning_deltasam/glue/conf/ (Hydra); results.json and logs go to the
Hydra run dir.
"""

from lightning_deltasam.glue.__main__ import cli_main

if __name__ == "__main__":
    cli_main()
