"""Stop strings for streamed text: text that could still become a stop string is held back.

    matcher = StopStringMatcher(['\\n\\n', 'END'])
    for delta in deltas:                  # text deltas as the detokenizer emits them
        out = matcher.feed(delta)         # safe to send: it can never be part of a stop string
        if matcher.stopped:
            break                         # `out` is the text before the stop string
    out = matcher.flush()                 # at the end: what was held back (no stop string came)

A stop string may span any number of tokens and deltas. The matcher keeps back the longest tail
of the text seen so far that is a prefix of some stop string, so a client never receives the
start of a stop string that then completes; once a stop string is found, the text from its
first character on is dropped, together with everything after it.
"""
from __future__ import annotations

from typing import Iterable, List, Optional


class StopStringMatcher:
    """Finds the earliest occurrence of any of `stops` in a stream of text deltas."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops: List[str] = [s for s in dict.fromkeys(stops) if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ''  # text received but not yet released
        self.stopped = False
        self.matched: Optional[str] = None  # the stop string found, once stopped

    def feed(self, delta: str) -> str:
        """Add `delta`; return the text that is now safe to send (may be empty)."""
        if self.stopped or not delta:
            return ''
        if not self.stops:
            return delta
        text = self._held + delta
        # Earliest stop string in the pending text (the released part held none of them, and a
        # match cannot start in it: any tail of it that was a prefix of a stop was held back).
        cut, found = -1, None
        for stop in self.stops:
            i = text.find(stop)
            if i >= 0 and (cut < 0 or i < cut or (i == cut and len(stop) > len(found))):
                cut, found = i, stop
        if found is not None:
            self.stopped, self.matched, self._held = True, found, ''
            return text[:cut]
        keep = self._holdback(text)
        self._held = text[len(text) - keep:] if keep else ''
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once no more text will come (empty after a stop)."""
        out, self._held = ('' if self.stopped else self._held), ''
        return out

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0


def truncate_at_stop(text: str, stops: Iterable[str]) -> tuple:
    """(text before the earliest stop string, the stop string or None): the non-streamed form."""
    matcher = StopStringMatcher(stops)
    out = matcher.feed(text)
    return (out if matcher.stopped else out + matcher.flush()), matcher.matched
