"""The python engine's process inside a script's namespace: run one script and variant, write the
outcome as JSON (`python -m conformance.packetdrill.worker SCRIPT VARIANT MODE OUT`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from conformance.packetdrill.interpreter import Outcome, run_script
from conformance.packetdrill.script import ScriptError, load
from conformance.packetdrill.variants import VARIANTS


def main(argv: list[str]) -> int:
    path, variant, mode, out = argv
    try:
        outcome = run_script(load(path), VARIANTS[variant], mode)
    except ScriptError as exc:
        outcome = Outcome("error", kind="script", message=str(exc))
    data = asdict(outcome)
    with open(out + ".tmp", "w") as f:
        json.dump(data, f)
    import os

    os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
