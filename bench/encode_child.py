"""Child process that runs reup's encoder once, then the same request again.

Started by `bench.reup_rows.run_encode`, which measures this process's peak RSS. usage:
python -m bench.encode_child '{"held": [...], "target": P, "out": F, "cache_dir": D}'
(`held` current generation first, as the encoder expects). The first request goes through
`reup.delta.cache.DeltaCache` (empty `cache_dir`), which calls the encoder; the encoder call
itself is timed. The second, identical request is what a controller serving another device
on the same base would do: it is timed whole. Without a delta cache module, the repeat is a
second plain encode. Prints one JSON object; `ok` false with `error` when the encoder is
missing or fails (the benchmark row then says so).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
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
    held, target, out = list(req["held"]), str(req["target"]), str(req["out"])
    try:
        import reup.delta.encode as mod
        from reup.delta.encode import encode
    except Exception as exc:  # noqa: BLE001 - any import failure is a row "encoder unavailable"
        print(json.dumps({"ok": False, "error": f"import reup.delta.encode: {exc!r}"}))
        return 0
    captured: dict[str, Any] = {}

    def timed_encode(h: Sequence[str], t: str, o: str, staged: Sequence[str] = (),
                     avoid: Sequence[str] = (), codecs: Sequence[str] | None = None) -> Any:
        t0 = time.perf_counter()
        stats = encode(h, t, o, staged)
        captured["seconds"] = time.perf_counter() - t0
        captured["stats"] = stats
        return stats

    try:
        try:
            from reup.delta.cache import DeltaCache
        except ImportError:
            timed_encode(held, target, out)
            t1 = time.perf_counter()
            encode(held, target, out + ".repeat")
            repeat, via = time.perf_counter() - t1, "second encode (no delta cache)"
        else:
            cache = DeltaCache(str(req["cache_dir"]), encoder=timed_encode)
            shutil.copyfile(cache.get(held, target).path, out)
            t1 = time.perf_counter()
            entry = cache.get(held, target)
            repeat = time.perf_counter() - t1
            via = "reup.delta.cache.DeltaCache (hit)" if entry.cached else "DeltaCache (miss!)"
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()[-3:]
        print(json.dumps({"ok": False, "error": f"encode failed: {exc!r}", "trace": tb}))
        return 0
    print(json.dumps({"ok": True, "seconds": captured["seconds"], "repeat_seconds": repeat, "repeat_via": via,
                      "stats": _stats_json(captured["stats"]), "module_file": mod.__file__}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
