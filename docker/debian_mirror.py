#!/usr/bin/env python3
"""Print the Debian archive mirror this host's apt already uses, for debootstrap (docker/build-base.sh).

A host behind its own mirror or proxy can reach that mirror and nothing else, so the base image must be
built from it, not from a public default. Reads ``sources.list`` and ``sources.list.d/*.list`` (one-line
format) and ``sources.list.d/*.sources`` (deb822), the files apt itself reads, in apt's order, and prints
the URI of the first ``deb`` entry that serves a Debian release (the wanted suite first, then any Debian
codename); security and backports archives are skipped. Exit 1, printing nothing, when none does.

    docker/debian_mirror.py [--suite bookworm] [--apt-dir /etc/apt]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

DEBIAN_SUITES = {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
                 "oldoldstable", "oldstable", "stable", "testing", "unstable"}


def one_line_entries(text: str) -> Iterator[tuple[str, str, list[str]]]:
    """``(type, uri, suites)`` of each ``deb URI SUITE COMPONENT...`` line; ``[options]`` skipped."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith("["):
            rest = rest.partition("]")[2].strip()
        words = rest.split()
        if len(words) >= 2:
            yield kind, words[0], [words[1]]


def deb822_entries(text: str) -> Iterator[tuple[str, str, list[str]]]:
    """``(type, uri, suites)`` for every type and URI of each stanza; ``Enabled: no`` stanzas skipped."""
    stanzas: list[dict[str, str]] = [{}]
    last = ""
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanzas[-1]:
                stanzas.append({})
            continue
        if raw[0] in " \t" and last:  # continuation line of a multi-line field
            stanzas[-1][last] += " " + raw.strip()
            continue
        key, _, value = raw.partition(":")
        last = key.strip().lower()
        stanzas[-1][last] = value.strip()
    for stanza in stanzas:
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        suites = stanza.get("suites", "").split()
        for kind in stanza.get("types", "").split():
            for uri in stanza.get("uris", "").split():
                yield kind, uri, suites


def entries(apt_dir: Path) -> Iterator[tuple[str, str, list[str]]]:
    """Every source entry, in the order apt reads its files."""
    main = apt_dir / "sources.list"
    if main.is_file():
        yield from one_line_entries(main.read_text(errors="replace"))
    parts = apt_dir / "sources.list.d"
    for path in sorted(parts.glob("*")) if parts.is_dir() else []:
        if path.suffix == ".list":
            yield from one_line_entries(path.read_text(errors="replace"))
        elif path.suffix == ".sources":
            yield from deb822_entries(path.read_text(errors="replace"))


def debian_mirror(apt_dir: Path, suite: str | None = None) -> str | None:
    """The URI of the first ``deb`` entry for ``suite``, else for any Debian release; None if none."""
    candidates = [(uri.rstrip("/"), suites) for kind, uri, suites in entries(apt_dir)
                  if kind == "deb" and "security" not in uri]
    releases = [(uri, [s for s in suites if s in DEBIAN_SUITES]) for uri, suites in candidates]
    for uri, names in releases:
        if suite and suite in names:
            return uri
    return next((uri for uri, names in releases if names), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None, help="the Debian release wanted (preferred when listed)")
    p.add_argument("--apt-dir", default="/etc/apt", type=Path, help="apt's configuration folder")
    args = p.parse_args(argv)
    uri = debian_mirror(args.apt_dir, args.suite)
    if uri is None:
        return 1
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
