"""`python -m qlab.run <overrides>`: one run (`task=train|generate|compare`), or a sweep with `-m` or
an experiment. Exit codes of a single run: 0 ok, 1 failed, 2 invalid config or data (nothing
loaded, nothing written), 3 out of memory."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qlab import config
from qlab.run import sweep
from qlab.tasks import EXIT, single

config.register()


# An absolute path: works the same from `python -m qlab.run`, the `qlab` script and any cwd.
@hydra.main(version_base="1.3", config_path=os.path.join(config.PROJECT_ROOT, "conf"), config_name="config")
def hydra_main(cfg: DictConfig):
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep.run_point(cfg)  # one isolated process per grid point
    code = single(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    """Hydra's own composition errors exit 2 with one line naming the key, like qlab's: checked
    here first, on the overrides alone (Hydra's flags with values, e.g. --config-name, leave
    the check to Hydra)."""
    args = sys.argv[1:]
    if not any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        try:
            config.check_overrides([a for a in args if not a.startswith("-")])
        except config.ConfigError as e:
            print(f"qlab: invalid config, nothing was run: {e}", file=sys.stderr)
            sys.exit(EXIT["invalid"])
    hydra_main()


if __name__ == "__main__":
    main()
