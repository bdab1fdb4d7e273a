"""What a commit will do to the fleet, as a report: pure assembly and rendering (markdown, table).

Called by `reup plan --rev` (cli/plan.py), which gathers the facts (targets at the
revision, each device's base, whether the target is built, the predicted stream
bytes) without contacting any device; this module turns them into the report
(`--format json`), a pull-request comment (`--format markdown`) and a terminal
table. Golden-tested in tests/unit/test_preview.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reup.core.errors import headline
from reup.core.model import Target

# change kinds, in the order the report lists them
UPDATE, INSTALL, UNCHANGED, ERROR = "update", "install", "unchanged", "error"


@dataclass(frozen=True)
class DeviceFacts:
    """What `reup plan` found out about one device at the planned revision."""

    target: Target
    base: str | None = None  # the toplevel the device is assumed to run
    base_from: str | None = None  # "state" (last acknowledged), "base" (the --base revision), "assume"
    built: bool = False  # the target's toplevel is in the local store
    stream_bytes: int | None = None
    full_bytes: int | None = None  # NAR bytes of what the device lacks: what a full copy moves
    note: str = ""  # why bytes are unknown


def change_of(f: DeviceFacts) -> str:
    if f.target.error is not None:
        return ERROR
    if f.base is None:
        return INSTALL
    return UNCHANGED if f.base == f.target.toplevel else UPDATE


def report(revision: Mapping[str, Any], devices: Iterable[DeviceFacts], waves: Sequence[str], *,
           base: Mapping[str, Any] | None = None, assume_base: str | None = None,
           removed: Iterable[str] = ()) -> dict[str, Any]:
    """The plan of `revision` as a JSON-ready document (the `--format json` output)."""
    facts = sorted(devices, key=lambda f: f.target.device)
    order = list(waves) + sorted({f.target.wave for f in facts} - set(waves))
    rows: dict[str, list[dict[str, Any]]] = {w: [] for w in order}
    errors = []
    counts = dict.fromkeys((UPDATE, INSTALL, UNCHANGED, ERROR), 0)
    for f in facts:
        change = change_of(f)
        counts[change] += 1
        if change == ERROR:
            errors.append({"device": f.target.device, "wave": f.target.wave, "line": headline(f.target.error or ""),
                           "error": f.target.error})
            continue
        rows[f.target.wave].append({
            "device": f.target.device, "change": change, "base": f.base, "base_from": f.base_from,
            "target": f.target.toplevel, "stream_bytes": f.stream_bytes, "full_bytes": f.full_bytes,
            "needs_build": None if f.built or change == UNCHANGED else f.target.drv_path, "note": f.note,
        })
    return {
        "revision": dict(revision),
        "base": dict(base) if base else None,
        "assume_base": assume_base,
        "summary": {"devices": len(facts), "changed": counts[UPDATE] + counts[INSTALL], "unchanged": counts[UNCHANGED],
                    "errors": counts[ERROR], "removed": len(list(removed := sorted(removed)))},
        "waves": [{"name": w, "devices": rows[w]} for w in order if rows[w]],
        "errors": errors,
        "removed": removed,
        "predicted_bytes": sum(r["stream_bytes"] or 0 for w in order for r in rows[w] if r["change"] != UNCHANGED),
        "full_bytes": sum(r["full_bytes"] or 0 for w in order for r in rows[w] if r["change"] != UNCHANGED),
    }


def store_name(path: str | None) -> str:
    """`/nix/store/<hash>-name` as `name (hash8)`."""
    if not path:
        return "-"
    base = path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{name} ({digest[:8]})" if name else base


def human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _ratio(sent: int | None, full: int | None) -> str:
    return f" ({100 * sent / full:.1f}%)" if sent is not None and full else ""


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def markdown(doc: Mapping[str, Any]) -> str:
    """A pull-request comment: summary, per wave each changed device, evaluation errors."""
    rev, base, s = doc["revision"], doc.get("base"), doc["summary"]
    against = (f" against `{base['commit'][:12]}`" if base else
               f" against `{store_name(doc['assume_base'])}`" if doc.get("assume_base") else
               " against what the controller last knew")
    out = [f"### reup plan: `{rev['commit'][:12]}`{against}", ""]
    if rev.get("message"):
        out += [f"> {_md(rev['message'])} ({_md(rev.get('author') or '')})", ""]
    parts = [f"**{s['changed']} of {s['devices']} devices change**", f"{s['unchanged']} unchanged"]
    if s["errors"]:
        parts.append(f"**{s['errors']} evaluation error{'s' if s['errors'] != 1 else ''}**")
    if s["removed"]:
        parts.append(f"{s['removed']} removed ({', '.join(doc['removed'])})")
    out.append(", ".join(parts) + ".")
    if s["changed"]:
        unknown = sum(1 for w in doc["waves"] for r in w["devices"] if r["change"] != UNCHANGED and r["stream_bytes"] is None)
        out.append(f"Predicted transfer: {human(doc['predicted_bytes'])} for a full copy of "
                   f"{human(doc['full_bytes'])}{_ratio(doc['predicted_bytes'], doc['full_bytes'])}"
                   + (f"; unknown for {unknown} device{'s' if unknown != 1 else ''} (see below)." if unknown else "."))
    for i, wave in enumerate(doc["waves"], 1):
        changed = [r for r in wave["devices"] if r["change"] != UNCHANGED]
        same = [r["device"] for r in wave["devices"] if r["change"] == UNCHANGED]
        out += ["", f"#### Wave {i}: `{wave['name']}` ({len(changed)} of {len(wave['devices'])} change)"]
        if changed:
            out += ["", "| device | change | predicted bytes | full copy | needs building |", "|---|---|---:|---:|---|"]
            for r in changed:
                what = (f"{store_name(r['base'])} → {store_name(r['target'])}" if r["change"] == UPDATE
                        else f"new: {store_name(r['target'])}")
                build = f"`{store_name(r['needs_build'])}`" if r["needs_build"] else "-"
                sent = human(r["stream_bytes"]) + _ratio(r["stream_bytes"], r["full_bytes"])
                if r["stream_bytes"] is None and r["note"]:
                    sent = f"? ({_md(r['note'])})"
                out.append(f"| `{r['device']}` | {what} | {sent} | {human(r['full_bytes'])} | {build} |")
        if same:
            out += ["", f"Unchanged: {', '.join(f'`{n}`' for n in same)}."]
    if doc["errors"]:
        out += ["", "#### Evaluation errors", "", "| device | error |", "|---|---|"]
        out += [f"| `{e['device']}` | `{_md(e['line'])}` |" for e in doc["errors"]]
    return "\n".join(out) + "\n"


def table(doc: Mapping[str, Any]) -> str:
    """The terminal form: one row per device."""
    rows = [("DEVICE", "WAVE", "CHANGE", "PREDICTED BYTES", "FULL BYTES", "NEEDS BUILD / ERROR")]
    for wave in doc["waves"]:
        for r in wave["devices"]:
            rows.append((r["device"], wave["name"], r["change"], "-" if r["stream_bytes"] is None else str(r["stream_bytes"]),
                         "-" if r["full_bytes"] is None else str(r["full_bytes"]),
                         store_name(r["needs_build"]) if r["needs_build"] else r["note"]))
    for e in doc["errors"]:
        rows.append((e["device"], e["wave"], "error", "-", "-", e["line"][:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows) + "\n"
