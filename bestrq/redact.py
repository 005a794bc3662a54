"""Passwords in URLs kept out of messages and records: a URL's `user:password@` is shown as
`user:***@`. Its own module, so that every stage's error line (`stages.common`) uses it without
depending on the download code."""

from __future__ import annotations

import re

# user:password@ in a URL's authority: what errors and records must not repeat.
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):[^/\s@]*@")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
