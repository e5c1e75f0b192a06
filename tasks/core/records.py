"""The serializer of the stages' Prefect result records (imported only where Prefect is: tasks/core/stage.py).

A record holds a stage's manifest as the manifest's own JSON and is read back as plain JSON into the type its
stage registered (`tasks.core.manifest.parse_manifest`). Prefect's JSON serializer is not used for them: its
decoder (prefect.serializers.prefect_json_object_decoder, the `object_hook` of every load) imports and builds
whatever class a `{"__class__": …}` object names, and raises any exception class an `{"__exc_type__": …}` object
names, at any depth of the payload; a record is written from a manifest whose counts and fields come from the
store.
"""

from __future__ import annotations

import json
from typing import ClassVar

from prefect.serializers import Serializer
from pydantic import ConfigDict, Field

from tasks.core.manifest import StageOutput, parse_manifest


class ManifestSerializer(Serializer):
    model_config: ClassVar[ConfigDict] = ConfigDict(extra="forbid")
    type: str = Field(default="cpt-manifest", frozen=True)

    def dumps(self, obj) -> bytes:
        if isinstance(obj, BaseException):  # a failed task's error, kept by Prefect as its result: words only
            return json.dumps({"error": type(obj).__name__, "message": str(obj)}).encode()
        if not isinstance(obj, StageOutput):
            raise TypeError(f"a stage task returns its manifest, not {type(obj).__name__}")
        return obj.model_dump_json().encode()

    def loads(self, blob: bytes) -> StageOutput | RuntimeError:
        doc = json.loads(blob)
        if isinstance(doc, dict) and set(doc) == {"error", "message"}:
            return RuntimeError(f"{doc['error']}: {doc['message']}")  # never the class it names
        return parse_manifest(blob)
