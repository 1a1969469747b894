"""`python -m qlab.run <overrides>`: one run, or a sweep with `-m` / an experiment."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from qlab import config as qconfig

qconfig.register()


# An absolute path: works the same from `python -m qlab.run`, the `qlab` script and any cwd.
@hydra.main(version_base="1.3", config_path=os.path.join(qconfig.PROJECT_ROOT, "conf"), config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from qlab.run import sweep

        return sweep.run_point(cfg)  # one isolated process per grid point
    from qlab.tasks.train import single

    code = single(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
