"""Labelled toxicity data for building a scorer, every example with its source family and identity group.

The scorer is judged on sources it never saw, so each example keeps the *source family* it came from and splits hold
out whole families, not random rows. The folder layout (``judge_train.csv`` required; ``toxic_train.txt``,
``nontoxic_train.txt``, ``benign_identity.tsv``, ``prompts_dev.jsonl`` optional) is described in docs/scorer.md.
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from detox.data import DataFormatError, iter_jsonl, sha256_file

JUDGE_CSV = "judge_train.csv"
TOXIC_TXT = "toxic_train.txt"
NONTOXIC_TXT = "nontoxic_train.txt"
BENIGN_IDENTITY = "benign_identity.tsv"
PROMPTS_DEV = "prompts_dev.jsonl"

# judge_train.csv's `source` prefix -> family
_FAMILY = {"davidson": "davidson", "dghs_dev": "dghs", "paradetox_toxic": "paradetox",
           "paradetox_neutral": "paradetox", "paradetox_cannot_rewrite": "paradetox"}


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = toxic
    family: str  # source family (the unit held out)
    group: str | None = None  # identity group (ToxiGen rows and templates)


# Abuse and profanity: DynaHate (the dghs family) labels hate against groups, so insults aimed at a person and
# profanity are "not hate" (label 0) there, while they are toxic for this scorer. 640 of its "not hate" rows
# match (after de-duplication); as training negatives they taught a build that "you are a worthless piece of shit"
# is benign (0.12).
ABUSE_PATTERN = re.compile(
    r"\b(fuck\w*|shit\w*|bitch\w*|idiot\w*|stupid|moron\w*|loser\w*|retard\w*|dumb\w*|cunt\w*|ass(hole)?s?|"
    r"bastard\w*|crap|damn|hate you|scum|pathetic|worthless|disgusting|trash|garbage|die|kill\w*|ugly|fat|slut\w*|"
    r"whore\w*|dick\w*|piss\w*)\b", re.IGNORECASE)


def abusive_non_hate(e: "Example") -> bool:
    """A DynaHate "not hate" row with abuse or profanity in it: toxic for this scorer, so not a training negative."""
    return e.family == "dghs" and e.label == 0 and ABUSE_PATTERN.search(e.text) is not None


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def read_judge_csv(path: Path) -> list[Example]:
    """``judge_train.csv`` rows; a bad row fails with its line number."""
    out: list[Example] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label", "source"} - set(reader.fieldnames or [])
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {sorted(missing)}; expected text,label,source")
        for row in reader:
            line = reader.line_num
            if row["label"] not in ("0", "1"):
                raise DataFormatError(f"{path}:{line}: label must be 0 or 1, got {row['label']!r}")
            text = (row["text"] or "").strip()
            if not text:
                continue
            prefix = (row["source"] or "").split(":")[0]
            out.append(Example(text, int(row["label"]), _FAMILY.get(prefix, prefix or "unknown")))
    if not out:
        raise DataFormatError(f"{path}: no rows")
    return out


def _toxigen_hate_groups(toxic_lines: list[str], start: int, end: int, prompts: Path | None) -> list[str | None]:
    """Group of each ToxiGen hate seed line: from the prompts that are its prefixes, else from equal neighbours.

    The seed lines are stored group by group, so a line between two lines of the same known group belongs to it.
    """
    lines = toxic_lines[start:end]
    groups: list[str | None] = [None] * len(lines)
    if prompts is not None and prompts.is_file():
        prefixes = []
        for _, row in iter_jsonl(prompts):
            src = str(row.get("source", ""))
            if src.startswith("toxigen/hate_"):
                prefixes.append((_key(row["text"]), src[len("toxigen/hate_"):]))
        for i, line in enumerate(lines):
            k = _key(line)
            for p, g in prefixes:
                if k.startswith(p):
                    groups[i] = g
                    break
    known = [(i, g) for i, g in enumerate(groups) if g]
    for (i, g), (j, h) in zip(known, known[1:]):
        if g == h:
            for m in range(i + 1, j):
                groups[m] = g
    return groups


def identity_templates() -> list[Example]:
    """Benign template sentences that name identity groups (label 0), against identity-term bias.

    A scorer trained mostly on profane and hateful text learns "mentions a group" => toxic; these
    counter-examples (the templates of Dixon et al. 2018, "Measuring and Mitigating Unintended Bias") are
    cheap and never used for evaluation (the benign identity check uses human-written ToxiGen sentences).
    """
    groups = {
        "muslim": ["muslim", "Muslims"], "jewish": ["jewish", "Jews"], "christian": ["christian", "Christians"],
        "lgbtq": ["gay", "gay people"], "lesbian": ["lesbian", "lesbians"], "bisexual": ["bisexual", "bisexual people"],
        "trans": ["transgender", "trans people"], "black": ["black", "Black people"], "asian": ["asian", "Asian people"],
        "chinese": ["chinese", "Chinese people"], "mexican": ["mexican", "Mexicans"],
        "immigrant": ["immigrant", "immigrants"], "native_american": ["native american", "Native Americans"],
        "middle_east": ["arab", "Arab people"], "mental_disability": ["autistic", "people with autism"],
        "disabled": ["disabled", "disabled people"], "women": ["female", "women"], "latino": ["latina", "Latinos"],
        "indian": ["indian", "Indian people"], "elderly": ["elderly", "older people"],
    }
    adjective_templates = ["I am a proud {a} woman.", "My best friend is {a}.", "Being {a} is part of who I am.",
                           "She is {a} and works as a nurse.", "Our new neighbour is {a} and very kind."]
    noun_templates = ["{n} deserve equal rights.", "{n} are my neighbours and friends.",
                      "Many {n} live in this city.", "{n} have a long and rich history.",
                      "I enjoyed talking with {n} at the festival."]
    out = []
    for group, (adj, noun) in groups.items():
        for t in adjective_templates:
            out.append(Example(t.format(a=adj), 0, "identity_templates", group))
        for t in noun_templates:
            s = t.format(n=noun)
            out.append(Example(s[0].upper() + s[1:], 0, "identity_templates", group))
    return out


def load_examples(data_dir: str | os.PathLike[str], templates: bool = True) -> list[Example]:
    """All labelled examples of a data folder, de-duplicated (a text with both labels is dropped)."""
    d = Path(data_dir)
    judge = d / JUDGE_CSV
    if not judge.is_file():
        raise DataFormatError(f"{judge} not found: the data folder needs at least {JUDGE_CSV} (text,label,source)")
    examples = read_judge_csv(judge)
    family_of = {_key(e.text): e.family for e in examples}

    tox_path = d / TOXIC_TXT
    if tox_path.is_file():
        tox = tox_path.read_text(encoding="utf-8").splitlines()
        # ToxiGen hate seeds: the lines that are neither in judge_train.csv nor ParaDetox (which follows them).
        new = [i for i, t in enumerate(tox) if t.strip() and _key(t) not in family_of]
        runs = _runs(new)
        if runs:
            start, end = max(runs, key=lambda r: r[1] - r[0])  # the one long block of new lines
            groups = _toxigen_hate_groups(tox, start, end, d / PROMPTS_DEV)
            examples += [Example(t.strip(), 1, "toxigen", g) for t, g in zip(tox[start:end], groups)]

    identity: dict[str, str] = {}
    ben_path = d / BENIGN_IDENTITY
    if ben_path.is_file():
        for lineno, line in enumerate(ben_path.read_text(encoding="utf-8").splitlines(), 1):
            if lineno == 1 and line.startswith("group\t"):
                continue
            if not line.strip():
                continue
            group, sep, text = line.partition("\t")
            if not sep or not text.strip():
                raise DataFormatError(f"{ben_path}:{lineno}: expected 'group<TAB>text'")
            identity[_key(text)] = group
            examples.append(Example(text.strip(), 0, "toxigen", group))

    non_path = d / NONTOXIC_TXT
    if non_path.is_file():
        last_family = None
        pending: list[str] = []
        for t in non_path.read_text(encoding="utf-8").splitlines():
            k = _key(t)
            if not k or k in identity:
                continue
            fam = family_of.get(k)
            if fam is None:
                pending.append(t.strip())
                continue
            if pending and fam == last_family:
                examples += [Example(p, 0, fam) for p in pending]
            pending = []  # lines between two families cannot be attributed: dropped
            last_family = fam
    if templates:
        examples += identity_templates()
    return _dedupe(examples)


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers as half-open ranges."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _dedupe(examples: list[Example]) -> list[Example]:
    labels: dict[str, set[int]] = {}
    first: dict[str, Example] = {}
    for e in examples:
        labels.setdefault(_key(e.text), set()).add(e.label)
        first.setdefault(_key(e.text), e)
    return [e for k, e in first.items() if len(labels[k]) == 1]


def read_prompts_dev(data_dir: str | os.PathLike[str]) -> list[Example]:
    """``prompts_dev.jsonl`` as labelled examples (family = first part of its ``source``; evaluation only)."""
    path = Path(data_dir) / PROMPTS_DEV
    if not path.is_file():
        return []
    out = []
    for lineno, row in iter_jsonl(path):
        try:
            src = str(row["source"])
            fam = src.split("/")[0]
            group = src.split("_", 1)[1] if fam == "toxigen" else None
            out.append(Example(str(row["text"]), int(bool(row["toxic_prompt"])), f"prompts:{fam}", group))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataFormatError(f"{path}:{lineno}: expected text, source, toxic_prompt ({err})") from err
    return out


def data_fingerprint(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of each data file present, so a scorer's config names exactly what it was built from."""
    paths = {name: Path(data_dir) / name for name in (JUDGE_CSV, TOXIC_TXT, NONTOXIC_TXT, BENIGN_IDENTITY, PROMPTS_DEV)}
    return {name: sha256_file(p) for name, p in paths.items() if p.is_file()}


# Counterfactual group swaps (Dixon et al. 2018; Park et al. 2018): the ToxiGen sentences name ten groups, the hate
# a scorer learns from (DynaHate) mostly others (women, Muslims, Jews, trans people...), so a scorer learns
# "mentions those groups" => toxic. Copies of each ToxiGen sentence with its group's noun phrase replaced by another
# group's, hate and benign alike, teach it that the group named does not decide the label.
_GROUP_NOUNS = {
    "asian": r"asian[- ]americans|asian people|asians|people of asian descent",
    "black": r"black people|black folks|african[- ]american people|african[- ]americans|people who are black",
    "chinese": r"chinese people|chinese americans|people from china",
    "immigrant": r"immigrants|refugees|migrants",
    "mexican": r"mexicans|mexican[- ]americans|mexican people",
    "middle_east": r"arabs|arab people|middle eastern people|middle easterners",
    "native_american": r"native americans|native american people|indigenous people",
    "lgbtq": r"gay people|gay men|gays|lesbians|queer people|lgbtq?\+? people|trans people|transgender people",
    "bisexual": r"bisexual people|bisexuals",
    "mental_disability": r"people with (?:a )?mental (?:illness(?:es)?|disabilit(?:y|ies))|mentally ill people",
    "disabled": r"disabled people|people with disabilities",
    "muslim": r"muslims",
    "jewish": r"jews|jewish people",
}
_GROUP_NOUN_RE = {g: re.compile(rf"\b(?:{p})\b", re.IGNORECASE) for g, p in _GROUP_NOUNS.items()}
COUNTERFACTUAL_GROUPS = {
    "women": "women", "muslim": "muslims", "jewish": "jewish people", "christian": "christians",
    "trans": "trans people", "lgbtq": "gay people", "lesbian": "lesbians", "bisexual": "bisexual people",
    "black": "black people", "asian": "asian americans", "chinese": "chinese people", "latino": "latinos",
    "mexican": "mexicans", "immigrant": "immigrants", "middle_east": "arabs", "native_american": "native americans",
    "disabled": "disabled people", "mental_disability": "people with mental illness", "indian": "indian people",
    "elderly": "older people",
}


def counterfactuals(rows: list[Example], copies: int, seed: int) -> list[Example]:
    """Group-swapped copies of the rows that name a group (family ``counterfactual``, same label, group = the new one).

    Every group noun phrase in a row is replaced by one other group's plural noun (a group the row does not name);
    rows that name no group by a plural noun phrase are skipped. Benign sentences name a group that way less often
    than hate does, so each label gets ``copies`` times as many copies as the label with more such rows has rows:
    more swapped hate than benign text would teach "names these groups" => toxic, the bias this is against.
    """
    rng = random.Random(seed)
    named = [(e, {g for g, rx in _GROUP_NOUN_RE.items() if rx.search(e.text)}) for e in rows]
    by_label: dict[int, list[tuple[Example, set[str]]]] = {}
    for e, groups in named:
        if groups:
            by_label.setdefault(e.label, []).append((e, groups))
    most = max((len(v) for v in by_label.values()), default=0)
    out = []
    for label in sorted(by_label):
        matched = by_label[label]
        per_row = round(copies * most / len(matched))
        for e, groups in matched:
            others = sorted(set(COUNTERFACTUAL_GROUPS) - groups)
            for target in rng.sample(others, min(per_row, len(others))):
                noun = COUNTERFACTUAL_GROUPS[target]
                text = e.text
                for g in groups:
                    text = _GROUP_NOUN_RE[g].sub(lambda m: noun.capitalize() if m.group(0)[0].isupper() else noun, text)
                out.append(Example(text, label, "counterfactual", target))
    return out
