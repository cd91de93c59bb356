"""JSON Schema of ``manifest.json``, generated from the pydantic models so docs and code cannot drift.

Regenerate after changing the manifest: ``python -m detox.artifacts.schema docs/manifest.schema.json``
(a test fails while docs/manifest.schema.json is out of date).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from detox.artifacts.manifest import FORMAT_VERSION, NAME_PATTERN, Manifest
from detox.artifacts.semver import MAX_VERSION_CHARS, VERSION_PATTERN


def manifest_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"detox artifact manifest (format_version {FORMAT_VERSION})"
    schema["description"] = (
        "manifest.json of a detox calibrator artifact. Loaders refuse other format_version values, unknown keys, "
        "and any file whose sha256/size differs from `files`. See docs/artifacts.md."
    )
    props = schema["properties"]
    props["format_version"]["const"] = FORMAT_VERSION
    # enforced by validators in code (re.fullmatch); mirrored here for other tools. JSON Schema patterns are ECMA-262,
    # where "$" without the m flag is the end of the input, so "^...$" is a full match there.
    props["name"]["pattern"] = f"^{NAME_PATTERN}$"
    props["version"]["pattern"] = f"^{VERSION_PATTERN}$"
    props["version"]["maxLength"] = MAX_VERSION_CHARS
    return schema


def render() -> str:
    return json.dumps(manifest_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args:
        with open(args[0], "w", encoding="utf-8") as f:
            f.write(render())
    else:
        sys.stdout.write(render())


if __name__ == "__main__":
    main()
