"""Ray entrypoints: harvest, fit, analyze, label, report and the pipeline (docs/architecture.md)."""

import os as _os

# JSON logs in jobs (CROSSDIFF_LOG_JSON): Ray forwards worker lines to the driver behind a
# "(Name pid=N)" prefix with colour codes, which breaks every worker line's JSON. Ray reads these
# when it is imported, so they are set here, before any entrypoint imports it.
if _os.environ.get("CROSSDIFF_LOG_JSON", "") not in ("", "0", "false"):
    _os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    _os.environ.setdefault("RAY_COLOR_PREFIX", "0")
