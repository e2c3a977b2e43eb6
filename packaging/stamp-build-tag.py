#!/usr/bin/env python3
"""Stamps a build tag into a copy of the herder binary: `herder status` then reports
`<version>+<TAG>`. Used by the upgrade tests (two binaries that report different versions
without a second build) and by packaging.

    packaging/stamp-build-tag.py BINARY TAG      (TAG: up to 28 printable ASCII characters)

The binary carries a 48-byte slot: the 20-byte marker `@@herder-build-tag@@`, then the tag,
NUL-padded (src/upgrade.rs, BUILD_TAG). The file is rewritten in place; its size does not change.
"""
import sys

MARKER = b"@@herder-build-tag@@"
ROOM = 48 - len(MARKER)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[4].strip())
    path, tag = sys.argv[1], sys.argv[2].encode()
    if not tag or len(tag) > ROOM or not all(33 <= b < 127 for b in tag):
        sys.exit(f"stamp-build-tag: TAG must be 1..{ROOM} printable ASCII characters")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(MARKER)
    if at < 0 or data.find(MARKER, at + 1) >= 0:
        sys.exit(f"stamp-build-tag: {path}: no single build-tag slot (not a herder binary?)")
    start = at + len(MARKER)
    data[start:start + ROOM] = tag + b"\0" * (ROOM - len(tag))
    with open(path, "r+b") as f:
        f.write(data)


if __name__ == "__main__":
    main()
