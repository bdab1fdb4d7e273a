"""`reup plan --rev` reports (reup.core.preview): the JSON document, and the markdown comment against
a golden file (tests/unit/golden/plan.md; REUP_UPDATE_GOLDEN=1 rewrites it after a deliberate change)."""

from __future__ import annotations

import os
from typing import Any

from reup.core import preview
from reup.core.errors import headline
from reup.core.model import Target
from reup.core.preview import DeviceFacts

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "plan.md")
S = "/nix/store/"
OLD = S + "0" * 32 + "-nixos-system-pi-1"
NEW = S + "1" * 32 + "-nixos-system-pi-2"
BOARD = S + "2" * 32 + "-nixos-system-board-2"
EVAL_ERROR = ("evaluation failed: … while evaluating the attribute 'config.system.build.toplevel'\n"
              "       at /nix/store/xyz-source/flake.nix:12:5:\n"
              "error: The option `services.sensord.port' has a value of type string, expected an integer.")


def facts() -> list[DeviceFacts]:
    def t(name: str, wave: str, top: str | None, error: str | None = None) -> Target:
        return Target(name, "b" * 40, wave, top and top.replace("nixos", "drv") + ".drv", top, error)

    return [
        DeviceFacts(t("pi-01", "canary", NEW), OLD, "state", True, 1234, 98765),
        DeviceFacts(t("pi-02", "main", NEW), OLD, "state", True, 1234, 98765),
        DeviceFacts(t("pi-03", "main", NEW), NEW, "state", True),
        DeviceFacts(t("board-01", "main", BOARD), None, None, False, note="not built"),
        DeviceFacts(t("board-02", "main", None, EVAL_ERROR)),
    ]


def doc() -> dict[str, Any]:
    rev = {"commit": "b" * 40, "author": "Alice <alice@example.org>", "message": "sensord: port | as string"}
    return preview.report(rev, facts(), ("canary", "main"), base={"commit": "a" * 40, "author": "", "message": ""},
                          removed=["pi-09"])


def test_report_document() -> None:
    d = doc()
    assert d["summary"] == {"devices": 5, "changed": 3, "unchanged": 1, "errors": 1, "removed": 1}
    assert [w["name"] for w in d["waves"]] == ["canary", "main"]
    assert d["predicted_bytes"] == 2468 and d["full_bytes"] == 2 * 98765
    rows = {r["device"]: r for w in d["waves"] for r in w["devices"]}
    assert rows["board-01"]["change"] == "install" and rows["board-01"]["needs_build"] == BOARD.replace("nixos", "drv") + ".drv"
    assert rows["pi-03"]["change"] == "unchanged" and rows["pi-03"]["needs_build"] is None
    assert d["errors"] == [{"device": "board-02", "wave": "main", "error": EVAL_ERROR,
                            "line": "error: The option `services.sensord.port' has a value of type string, "
                                    "expected an integer."}]


def test_markdown_golden() -> None:
    text = preview.markdown(doc())
    if os.environ.get("REUP_UPDATE_GOLDEN"):
        with open(GOLDEN, "w", encoding="utf-8") as f:
            f.write(text)
    with open(GOLDEN, encoding="utf-8") as f:
        assert text == f.read()


def test_table_and_error_line() -> None:
    lines = preview.table(doc()).splitlines()
    assert lines[0].split() == ["DEVICE", "WAVE", "CHANGE", "PREDICTED", "BYTES", "FULL", "BYTES", "NEEDS", "BUILD", "/", "ERROR"]
    assert [ln.split()[0] for ln in lines[1:]] == ["pi-01", "board-01", "pi-02", "pi-03", "board-02"]
    assert headline("a\n\nlast line\n") == "last line"
    nix = ("error: builder for '/nix/store/x.drv' failed with exit code 1\nerror: 1 dependencies failed\n"
           "(use '--show-trace' to show detailed location information)")
    assert headline(nix) == "error: builder for '/nix/store/x.drv' failed with exit code 1"
    assert preview.human(1536) == "1.5 KiB" and preview.human(None) == "?"
