"""Semantic versions (semver.org 2.0) and npm-style ranges: ``^1.2``, ``~1.2.3``, ``>=1.2 <2``, ``1.x``, ``*``.

Registries hold many versions of one calibrator; ``NAME@RANGE`` picks the newest that fits. PEP 440
(``packaging``) orders and matches versions differently (no ``^``, other pre-release rules), so the few
rules needed are implemented here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Iterable

# Every pattern here is used with re.fullmatch, never .match with "$" (which also matches before a trailing newline:
# "9.9.9\n" would pass and become a file name). VERSION_PATTERN has no anchors so schema.py can mirror it.
VERSION_PATTERN = (r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                   r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
MAX_VERSION_CHARS = 128  # versions become file names (VERSION.detox); keep them well under NAME_MAX
_VERSION = re.compile(VERSION_PATTERN)
_PARTIAL = re.compile(r"v?(\d+|[xX*])(?:\.(\d+|[xX*]))?(?:\.(\d+|[xX*]))?(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
                      r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?")
_COMPARATOR = re.compile(r"(\^|~|>=|<=|>|<|=)?(\S+)")


class RangeError(ValueError):
    """A version or range string that cannot be parsed."""


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    @classmethod
    def parse(cls, text: str) -> "Version":
        m = _VERSION.fullmatch(text) if isinstance(text, str) and len(text) <= MAX_VERSION_CHARS else None
        if not m:
            raise RangeError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
        pre = tuple(m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre, m.group(5) or "")

    def _key(self) -> tuple:
        # A release sorts after its pre-releases; numeric identifiers sort before alphanumeric ones.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: "Version") -> bool:
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            s += "-" + ".".join(self.prerelease)
        return s + (f"+{self.build}" if self.build else "")

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)


@dataclass(frozen=True)
class _Cmp:
    op: str  # one of >=, >, <, <=, =
    version: Version

    def test(self, v: Version) -> bool:
        if self.op == "=":
            return v == self.version
        return {">=": v >= self.version, ">": v > self.version, "<": v < self.version, "<=": v <= self.version}[self.op]


def is_version(text: object) -> bool:
    """True for a complete semantic version (the only strings registries turn into file names)."""
    try:
        Version.parse(text)  # type: ignore[arg-type]
    except RangeError:
        return False
    return True


def _partial(text: str) -> tuple[list[int | None], tuple[str, ...]]:
    m = _PARTIAL.fullmatch(text)
    if not m:
        raise RangeError(f"{text!r} is not a version or partial version (e.g. 1, 1.2, 1.2.3, 1.x)")
    parts: list[int | None] = []
    for g in m.group(1, 2, 3):
        parts.append(None if g is None or g in "xX*" else int(g))
    # anything after a wildcard is a wildcard too ("1.x.3" means "1.x")
    for i, p in enumerate(parts):
        if p is None:
            parts[i + 1:] = [None] * (2 - i)
            break
    pre = tuple(m.group(4).split(".")) if m.group(4) else ()
    return parts, pre


def _v(parts: list[int | None], pre: tuple[str, ...] = ()) -> Version:
    return Version(parts[0] or 0, parts[1] or 0, parts[2] or 0, pre)


def _bump(parts: list[int | None], index: int, upper: bool = True) -> Version:
    """The first version past the block fixed by ``parts[:index + 1]``.

    As an upper bound it carries pre-release ``0`` so that e.g. ``2.0.0-rc.1`` is outside ``^1.2``.
    """
    fixed = [(p or 0) for p in parts[: index + 1]]
    fixed[index] += 1
    fixed += [0] * (3 - len(fixed))
    return Version(fixed[0], fixed[1], fixed[2], ("0",) if upper else ())


def _comparators(token: str) -> list[_Cmp]:
    m = _COMPARATOR.fullmatch(token)
    if not m:
        raise RangeError(f"cannot parse range item {token!r}")
    op, rest = m.group(1) or "", m.group(2)
    if rest in ("*", "x", "X", "latest"):
        return []
    parts, pre = _partial(rest)
    known = sum(p is not None for p in parts)
    if op == "^":
        # allow changes that do not modify the left-most non-zero component given
        idx = next((i for i, p in enumerate(parts[:known]) if p != 0), max(known - 1, 0))
        return [_Cmp(">=", _v(parts, pre)), _Cmp("<", _bump(parts, idx))]
    if op == "~":
        return [_Cmp(">=", _v(parts, pre)), _Cmp("<", _bump(parts, 1 if known >= 2 else 0))]
    if op in ("", "=") and known == 3:
        return [_Cmp("=", _v(parts, pre))]
    if op in ("", "="):  # x-range: 1.2 == 1.2.x == >=1.2.0 <1.3.0-0
        return [] if known == 0 else [_Cmp(">=", _v(parts)), _Cmp("<", _bump(parts, known - 1))]
    if known == 3 or op in (">=", "<"):
        return [_Cmp(op, _v(parts, pre))]
    # partial with > or <=: ">1.2" means ">=1.3.0", "<=1.2" means "<1.3.0"
    if not known:
        return []
    return [_Cmp(">=", _bump(parts, known - 1, upper=False))] if op == ">" else [_Cmp("<", _bump(parts, known - 1))]


@dataclass(frozen=True)
class Range:
    """A union (``||``) of intersections of comparators; pre-releases match only when a comparator names one."""

    text: str
    alternatives: tuple[tuple[_Cmp, ...], ...]

    @classmethod
    def parse(cls, text: str) -> "Range":
        """Parse a range; an empty alternative (``"1.0.0 ||"``, ``"|| 2"``) or any junk is an error, never ``*``:
        a stray ``||`` must not widen a pinned version. Only a wholly empty range means ``*`` (latest)."""
        if not isinstance(text, str):
            raise RangeError(f"a version range must be text, not {type(text).__name__}")
        text = text.strip() or "*"
        if len(text) > 4 * MAX_VERSION_CHARS:
            raise RangeError(f"version range {text[:40]!r}... is too long")
        alternatives = []
        for alt in text.split("||"):
            # "1.2.3 - 2.0.0" hyphen ranges are rare for calibrators; not supported ("-" is refused below)
            tokens = re.sub(r"(\^|~|>=|<=|>|<|=)\s+", r"\1", alt.replace(",", " ")).split()
            if not tokens:
                raise RangeError(f"{text!r} has an empty alternative around '||'; write e.g. 1.0.0 || ^2")
            cmps: list[_Cmp] = []
            for token in tokens:
                cmps.extend(_comparators(token))
            alternatives.append(tuple(cmps))
        return cls(text, tuple(alternatives))

    def matches(self, version: Version | str) -> bool:
        v = Version.parse(version) if isinstance(version, str) else version
        for cmps in self.alternatives:
            if not all(c.test(v) for c in cmps):
                continue
            if v.prerelease and not any(c.version.prerelease and c.version.release == v.release for c in cmps):
                continue
            return True
        return False

    def best(self, versions: Iterable[str]) -> str | None:
        """The highest of ``versions`` (strings; unparsable ones ignored) that matches, or ``None``."""
        ok = [v for v in _parse_all(versions) if self.matches(v)]
        return str(max(ok)) if ok else None

    def __str__(self) -> str:
        return self.text


def _parse_all(versions: Iterable[str]) -> list[Version]:
    out = []
    for s in versions:
        try:
            out.append(Version.parse(s))
        except RangeError:
            continue
    return out


def sort_versions(versions: Iterable[str], newest_first: bool = True) -> list[str]:
    """Version strings in semver order (unparsable ones dropped)."""
    return [str(v) for v in sorted(_parse_all(versions), reverse=newest_first)]
