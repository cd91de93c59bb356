"""``resolve_calibrator``: from what a user named (nothing, a path, an archive, ``NAME@RANGE``) to a loaded
:class:`~detox.runtime.Calibrator` checked against a target's fingerprint.

It sits below the adapters and the backends (it imports neither), so every layer above can use it.
"""

from __future__ import annotations

import os
from typing import Any

from detox.artifacts.manifest import TargetFingerprint
from detox.artifacts.registry import looks_like_ref, open_registry
from detox.artifacts.shipped import find_shipped_for, no_shipped_match_message
from detox.artifacts.store import ArtifactError
from detox.runtime import Calibrator


def resolve_calibrator(calibrator: Calibrator | str | os.PathLike[str] | None, fingerprint: TargetFingerprint,
                       require_signature: Any = None) -> Calibrator:
    """Load the calibrator a user named (or the shipped one that matches) and check it fits the target.

    A string that is not an existing path but looks like ``NAME@RANGE`` is resolved through the registry
    (``$DETOX_REGISTRY``): the newest version in range aligned to this exact target.
    """
    if calibrator is None:
        path = find_shipped_for(fingerprint)
        if path is None:
            raise ArtifactError(no_shipped_match_message(fingerprint))
        calibrator = Calibrator.load(path, require_signature=require_signature)
    elif isinstance(calibrator, Calibrator):
        if require_signature is not None:  # re-check the files it was loaded from
            calibrator = Calibrator.load(calibrator.path, require_signature=require_signature)
    else:
        if not os.path.exists(calibrator) and looks_like_ref(str(calibrator)):
            _, _, calibrator = open_registry().pull(str(calibrator), fingerprint)
        calibrator = Calibrator.load(calibrator, require_signature=require_signature)
    calibrator.require_aligned_to(fingerprint)
    return calibrator
