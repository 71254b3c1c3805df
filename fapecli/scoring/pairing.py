"""Pairing restored outputs with their references by name.

An output is matched to a reference by, in order (each step only for what is still
unmatched, and only where the match is one-to-one):

1. ``path``:  the same relative path (``out/sub/x.png`` ~ ``gt/sub/x.png``);
2. ``path``:  the same relative path without extension (``out/sub/x.png`` ~ ``gt/sub/x.jpg``);
3. ``stem``:  the same file stem anywhere in the trees (``out/x.png`` ~ ``gt/a/x.jpg``);
4. ``suffix``: the same stem, case-folded, after dropping one common restore/role suffix
   on either side (``x_fape.png`` ~ ``x.png``, ``x_lq.png`` ~ ``x_gt.png``); the suffixes are
   ``RESTORE_SUFFIXES`` after ``_``, ``-`` or ``.``.

A single output file with a single reference file is always a pair. Anything left is
reported as unmatched, and several candidates for one name as a problem.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fapecli.io import InputItem, discover_images

RESTORE_SUFFIXES = (
    "fape",
    "restored",
    "restore",
    "output",
    "out",
    "pred",
    "result",
    "sr",
    "gt",
    "hr",
    "clean",
    "ref",
    "target",
    "lq",
    "lr",
    "x2",
    "x3",
    "x4",
)
_SUFFIX = re.compile(r"[_\-.](?:" + "|".join(RESTORE_SUFFIXES) + r")$", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One output and its reference (None when scoring without references)."""

    output: Path
    ref: Path | None
    name: str  # the output's relative path, for reports
    matched_by: str = ""  # "given", "path", "stem", "suffix" or "" (no reference)


@dataclass
class Pairing:
    pairs: list[Pair] = field(default_factory=list)
    unmatched_outputs: list[Path] = field(default_factory=list)
    unmatched_refs: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (input, message)


def loose_stem(stem: str) -> str:
    """The stem case-folded, without one trailing restore/role suffix ("x_fape" -> "x")."""
    return _SUFFIX.sub("", stem).casefold() or stem.casefold()


_LEVELS: tuple[tuple[str, Callable[[InputItem], str]], ...] = (
    ("path", lambda item: item.relative.as_posix()),
    ("path", lambda item: item.relative.with_suffix("").as_posix()),
    ("stem", lambda item: item.relative.stem),
    ("suffix", lambda item: loose_stem(item.relative.stem)),
)


def _match_level(
    outs: list[InputItem], refs: list[InputItem], key: Callable[[InputItem], str]
) -> tuple[dict[int, int], set[int]]:
    """One-to-one matches (output index -> ref index) by key, and outputs with several."""
    out_groups: dict[str, list[int]] = defaultdict(list)
    ref_groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(outs):
        out_groups[key(item)].append(i)
    for j, item in enumerate(refs):
        ref_groups[key(item)].append(j)
    matches: dict[int, int] = {}
    ambiguous: set[int] = set()
    for k, out_idx in out_groups.items():
        ref_idx = ref_groups.get(k, [])
        if len(out_idx) == 1 and len(ref_idx) == 1:
            matches[out_idx[0]] = ref_idx[0]
        elif ref_idx:
            ambiguous.update(out_idx)
    return matches, ambiguous


def pair_items(outs: Sequence[InputItem], refs: Sequence[InputItem]) -> Pairing:
    """Match discovered outputs to discovered references (see the module docstring)."""
    result = Pairing()
    matched: dict[int, tuple[int, str]] = {}
    out_left = list(range(len(outs)))
    ref_left = list(range(len(refs)))
    ambiguous: set[int] = set()
    for how, key in _LEVELS:
        found, unclear = _match_level([outs[i] for i in out_left], [refs[j] for j in ref_left], key)
        for oi, rj in found.items():
            matched[out_left[oi]] = (ref_left[rj], how)
        ambiguous |= {out_left[oi] for oi in unclear}
        taken_out = {out_left[oi] for oi in found}
        taken_ref = {ref_left[rj] for rj in found.values()}
        out_left = [i for i in out_left if i not in taken_out]
        ref_left = [j for j in ref_left if j not in taken_ref]
    for i, item in enumerate(outs):
        if i in matched:
            j, how = matched[i]
            result.pairs.append(Pair(item.path, refs[j].path, item.relative.as_posix(), how))
    result.unmatched_outputs = [outs[i].path for i in out_left]
    result.unmatched_refs = [refs[j].path for j in ref_left]
    for i in out_left:
        if i in ambiguous:
            name = outs[i].relative.as_posix()
            result.problems.append(
                (name, "several references or outputs share its name; not paired")
            )
    return result


def pair_images(
    outputs: Sequence[str | Path],
    refs: Sequence[str | Path] | None = None,
    *,
    recursive: bool = True,
) -> Pairing:
    """Discover the images under outputs (and refs) and pair them by relative path or stem."""
    outs, problems = discover_images(list(outputs), recursive=recursive)
    if refs is None:
        pairing = Pairing([Pair(it.path, None, it.relative.as_posix()) for it in outs])
        pairing.problems = list(problems)
        return pairing
    ref_items, ref_problems = discover_images(list(refs), recursive=recursive)
    if _single_files(outputs, outs) and _single_files(refs, ref_items):
        pair = Pair(outs[0].path, ref_items[0].path, outs[0].relative.as_posix(), "given")
        pairing = Pairing([pair])
    else:
        pairing = pair_items(outs, ref_items)
    pairing.problems = list(problems) + list(ref_problems) + pairing.problems
    return pairing


def _single_files(args: Sequence[str | Path], items: Sequence[InputItem]) -> bool:
    return len(args) == 1 and len(items) == 1 and Path(args[0]).is_file()
