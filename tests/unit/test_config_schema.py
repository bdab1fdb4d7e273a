"""The configuration schema is the one source of truth: docs/controller.md's key reference and the
chart's values.schema.json (its `config` part) are held against the pydantic models here."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from reup.config.fleet_toml import DeviceSpec, RolloutSpec
from reup.config.reup_toml import ReupToml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _docs_rows() -> dict[str, str]:
    """`key` -> the default column of docs/controller.md's reference tables."""
    with open(os.path.join(ROOT, "docs", "controller.md"), encoding="utf-8") as f:
        text = f.read()
    rows: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([a-z_<>.]+)` \|(.*)$", line)
        if m and "." in m.group(1):
            cells = [c.strip() for c in m.group(2).split(" | ")]
            # fleet.toml's table has a type column before the default; reup.toml's does not
            rows[m.group(1)] = cells[1] if m.group(1).startswith(("devices.", "rollout.")) else cells[0]
    return rows


def _keys() -> dict[str, FieldInfo]:
    keys: dict[str, FieldInfo] = {}
    for section, info in ReupToml.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        keys.update({f"{section}.{k}": v for k, v in model.model_fields.items()})
    keys.update({f"devices.<name>.{k}": v for k, v in DeviceSpec.model_fields.items()})
    keys.update({f"rollout.{k}": v for k, v in RolloutSpec.model_fields.items()})
    return keys


def _render(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list | dict):
        return "`" + json.dumps(value) + "`"
    return str(value)


def test_docs_reference_every_key_with_its_default() -> None:
    docs, keys = _docs_rows(), _keys()
    assert set(docs) == set(keys), (set(keys) - set(docs), set(docs) - set(keys))
    for key, info in keys.items():
        expected = _render(info)
        if key in ("devices.<name>.config",):  # defaults to the device's name
            continue
        assert docs[key].replace("`", "").startswith(expected.replace("`", "")), (key, docs[key], expected)


def _chart_config() -> dict[str, Any]:
    with open(os.path.join(ROOT, "charts", "reup", "values.schema.json"), encoding="utf-8") as f:
        config: dict[str, Any] = json.load(f)["properties"]["config"]
    return config


JSON_TYPES = {"integer": (int,), "number": (float, int), "string": (str,), "boolean": (bool,), "object": (dict,)}


@pytest.mark.parametrize("section", sorted(_chart_config()["properties"]))
def test_chart_values_schema_matches_the_config_schema(section: str) -> None:
    chart = _chart_config()["properties"][section]
    keys = _keys()
    for key, spec in chart["properties"].items():
        info = keys.get(f"{section}.{key}")
        assert info is not None, f"the chart's config.{section}.{key} is no reup.toml key"
        if spec.get("type") in JSON_TYPES and not info.is_required():
            default = info.get_default(call_default_factory=True)
            if default is not None:
                assert isinstance(default, JSON_TYPES[spec["type"]]), (section, key, spec, default)
        bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in info.metadata
                  if type(m).__name__ in ("Ge", "Le")}
        if "minimum" in spec or "Ge" in bounds:
            assert spec.get("minimum") == bounds.get("Ge"), (section, key, spec, bounds)
    assert chart.get("additionalProperties") is False
