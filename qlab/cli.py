"""The `qlab` console script: one verb per job.

  qlab run [hydra overrides]        one run, or a sweep with -m / experiment=...  (= python -m qlab.run)
  qlab report RESULTS_DIR [...]     tables, plots and statistics from result.json files
  qlab estimate [--model M] [--all] memory predicted from the config alone (= python -m qlab.claims.estimate)
  qlab chat RUN_DIR [--prompt ...]  talk to the base model plus a run's adapter
  qlab generate-bench [--run RUN]   generation speed and memory per quantization type (one process each)
  qlab eval RUN_OR_MODEL [--tasks]  lm-evaluation-harness on a base (quantized) with a run's adapter
  qlab claims [--no-run]            the QLoRA paper's claims: run what is missing, compute verdicts
"""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "run": "qlab.run.__main__:main",
    "report": "qlab.results.report:main",
    "estimate": "qlab.claims.estimate:main",
    "chat": "qlab.tasks.chat:main",
    "generate-bench": "qlab.tasks.generate:main",
    "eval": "qlab.tasks.eval:main",
    "claims": "qlab.claims.verdicts:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, func = VERBS[argv[0]].split(":")
    sys.argv = [f"qlab {argv[0]}", *argv[1:]]  # Hydra and argparse read sys.argv
    result = getattr(importlib.import_module(module), func)()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
