"""StopStringMatcher: streamed text never leaks the start of a stop string."""
import random

import pytest

from lmdeploy.serve.openai.stop_strings import StopStringMatcher, truncate_at_stop


def stream(text, stops, cuts):
    m = StopStringMatcher(stops)
    out, i = [], 0
    for j in sorted(cuts) + [len(text)]:
        piece = m.feed(text[i:j])
        out.append(piece)
        i = j
        if m.stopped:
            break
    out.append(m.flush())
    return ''.join(out), m, out


@pytest.mark.parametrize('text,stops,expected', [
    ('1, 2, 3, 4, 5, 6', ['4, 5'], '1, 2, 3, '),
    ('hello world', ['xyz'], 'hello world'),
    ('abcabd', ['abd'], 'abc'),
    ('aaab', ['aab', 'ab'], 'a'),
    ('stop at end', ['end'], 'stop at '),
    ('9', ['9!'], '9'),
    ('', ['x'], ''),
])
def test_all_splits(text, stops, expected):
    rng = random.Random(0)
    for _ in range(200):
        cuts = rng.sample(range(len(text) + 1), k=rng.randint(0, len(text)))
        got, m, pieces = stream(text, stops, cuts)
        assert got == expected, (cuts, pieces)
        # no released piece ever holds text that later turns out to start a stop string
        released = ''.join(pieces)
        assert released == expected
    assert truncate_at_stop(text, stops)[0] == expected


def test_holdback_is_minimal():
    m = StopStringMatcher(['END'])
    assert m.feed('abc E') == 'abc '
    assert m.feed('N') == ''
    assert m.feed('x') == 'ENx'
    assert m.feed('EN') == ''
    assert m.feed('D tail') == ''
    assert m.stopped and m.matched == 'END'
    assert m.feed('more') == '' and m.flush() == ''


def test_no_stops_passthrough():
    m = StopStringMatcher([])
    assert m.feed('abc') == 'abc' and m.flush() == '' and not m.stopped
