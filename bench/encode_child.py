"""Child process that runs reup's encoder once, then the same request again.

Started by `bench.reup_rows.run_encode`, which measures this process's peak RSS with
`os.wait4`. usage: python -m bench.encode_child '{"held": [...], "target": P, "out": F,
"repeat_out": F2}'. Prints one JSON object; `ok` false with `error` when the encoder is
missing or fails (the benchmark row then says so).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from typing import Any


def _stats_json(stats: Any) -> object:
    to_json = getattr(stats, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return repr(stats)


def main(argv: list[str]) -> int:
    req = json.loads(argv[1])
    try:
        import reup.delta.encode as mod
        from reup.delta.encode import encode
    except Exception as exc:  # noqa: BLE001 - any import failure is a row "encoder unavailable"
        print(json.dumps({"ok": False, "error": f"import reup.delta.encode: {exc!r}"}))
        return 0
    try:
        t0 = time.perf_counter()
        stats = encode(req["held"], req["target"], req["out"])
        seconds = time.perf_counter() - t0
        repeat = None
        if req.get("repeat_out"):
            t1 = time.perf_counter()
            encode(req["held"], req["target"], req["repeat_out"])
            repeat = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()[-3:]
        print(json.dumps({"ok": False, "error": f"encode failed: {exc!r}", "trace": tb}))
        return 0
    print(json.dumps({"ok": True, "seconds": seconds, "repeat_seconds": repeat, "stats": _stats_json(stats),
                      "module_file": mod.__file__},
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
