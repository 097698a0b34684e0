"""Dialogues for the embedded demo model (MiniChat), generated with checkable answers.

Every dialogue is a list of (user, bot) turns. The tasks are small enough for a ~6M-parameter
model to learn exactly, and each answer can be recomputed by `answer_for` in tests:
  - addition / subtraction of numbers below 100 (English and Chinese phrasings),
  - follow-ups that use the previous answer ("Add 7 to that."), so a later turn needs the history,
  - reversing a word from WORDS,
  - counting up a short range,
  - greetings and "who are you".
"""
from __future__ import annotations

import random
import re
from typing import List, Optional, Tuple

Turn = Tuple[str, str]

WORDS = (
    'apple banana cherry grape lemon mango melon orange peach pear plum berry water fire earth '
    'stone river ocean cloud storm rain snow wind light night dream music piano guitar violin '
    'drum story poem book paper pencil table chair window door house garden flower forest tree '
    'leaf branch root seed bird eagle robin tiger lion zebra horse mouse rabbit turtle snake '
    'whale shark dolphin camel monkey panda koala spider beetle bottle cup plate spoon fork knife '
    'bread butter cheese honey sugar salt pepper rice pasta pizza salad soup coffee tea juice milk '
    'red blue green yellow purple silver golden black white happy quiet brave clever gentle swift '
    'bright dark cold warm sunny rocket planet comet star moon galaxy engine motor wheel bridge '
    'tower castle island desert valley canyon mountain hill lake beach harbor market school '
    'teacher doctor farmer pilot sailor artist writer singer dancer player winter summer spring '
    'autumn monday friday morning evening number letter matrix vector kernel token model cache '
    'server client python system memory record signal module camera laptop phone screen mirror '
    'pillow blanket candle lantern jacket button pocket ticket planet basket circle square '
    'triangle silence thunder journey forward simple random little yellow orbit'
).split()

GREETINGS_EN = ('hi', 'hello', 'hey', 'Hi!', 'Hello!', 'hello there', 'good morning')
GREETING_REPLY = 'Hello! I am MiniChat. Ask me to add numbers, subtract them or reverse a word.'
WHO_EN = ('who are you?', 'Who are you?', 'what can you do?', 'What can you do?')
WHO_REPLY = ('I am MiniChat, a tiny demo model. I can add and subtract numbers below 100, '
             'reverse a word and count.')
GREETINGS_ZH = ('你好', '你好！', '您好')
GREETING_REPLY_ZH = '你好！我是 MiniChat。我会做加法和减法，也会倒写单词。'


def add_question(a: int, b: int, rng: random.Random) -> str:
    return rng.choice((f'What is {a} + {b}?', f'What is {a} plus {b}?', f'Add {a} and {b}.',
                       f'Compute {a} + {b}.', f'{a} + {b} = ?'))


def sub_question(a: int, b: int, rng: random.Random) -> str:
    return rng.choice((f'What is {a} - {b}?', f'What is {a} minus {b}?',
                       f'Subtract {b} from {a}.', f'{a} - {b} = ?'))


def reverse_question(word: str, rng: random.Random) -> str:
    return rng.choice((f'Reverse the word {word}.', f'Reverse {word}.',
                       f'Spell {word} backwards.', f'What is {word} reversed?'))


def count_question(a: int, b: int, rng: random.Random) -> str:
    return rng.choice((f'Count from {a} to {b}.', f'Count {a} to {b}.'))


def add_answer(a: int, b: int) -> str:
    return f'{a} + {b} = {a + b}.'


def sub_answer(a: int, b: int) -> str:
    return f'{a} - {b} = {a - b}.'


def reverse_answer(word: str) -> str:
    return f'{word} reversed is {word[::-1]}.'


def count_answer(a: int, b: int) -> str:
    return ', '.join(str(i) for i in range(a, b + 1)) + '.'


_ADD = re.compile(r'^(?:What is (\d+) (?:\+|plus) (\d+)\?|Add (\d+) and (\d+)\.|Compute (\d+) \+ (\d+)\.'
                  r'|(\d+) \+ (\d+) = \?)$')
_SUB = re.compile(r'^(?:What is (\d+) (?:-|minus) (\d+)\?|(\d+) - (\d+) = \?)$')
_SUB_FROM = re.compile(r'^Subtract (\d+) from (\d+)\.$')
_REV = re.compile(r'^(?:Reverse the word (\w+)\.|Reverse (\w+)\.|Spell (\w+) backwards\.'
                  r'|What is (\w+) reversed\?)$')
_COUNT = re.compile(r'^Count (?:from )?(\d+) to (\d+)\.$')
_ZH_ADD = re.compile(r'^(\d+) 加 (\d+) 等于几？$')
_FOLLOW_ADD = re.compile(r'^Add (\d+) to that\.$')
_FOLLOW_SUB = re.compile(r'^Subtract (\d+) from that\.$')


def _numbers(match) -> List[int]:
    return [int(g) for g in match.groups() if g is not None]


def answer_for(question: str, previous: Optional[int] = None) -> Optional[str]:
    """The reply MiniChat was trained to give to `question`, or None if it is no known task.

    `previous` is the result of the previous arithmetic turn, for "Add 7 to that." follow-ups.
    """
    q = question.strip()
    if m := _ADD.match(q):
        return add_answer(*_numbers(m))
    if m := _SUB.match(q):
        return sub_answer(*_numbers(m))
    if m := _SUB_FROM.match(q):
        b, a = _numbers(m)
        return sub_answer(a, b)
    if m := _REV.match(q):
        return reverse_answer(next(g for g in m.groups() if g))
    if m := _COUNT.match(q):
        return count_answer(*_numbers(m))
    if m := _ZH_ADD.match(q):
        a, b = _numbers(m)
        return f'{a} 加 {b} 等于 {a + b}。'
    if previous is not None and (m := _FOLLOW_ADD.match(q)):
        return add_answer(previous, int(m.group(1)))
    if previous is not None and (m := _FOLLOW_SUB.match(q)):
        return sub_answer(previous, int(m.group(1)))
    if q in GREETINGS_EN:
        return GREETING_REPLY
    if q in WHO_EN:
        return WHO_REPLY
    if q in GREETINGS_ZH:
        return GREETING_REPLY_ZH
    return None


def result_of(answer: str) -> Optional[int]:
    """The number an arithmetic answer ends with ('12 + 5 = 17.' -> 17)."""
    m = re.search(r'= (-?\d+)[.。]$', answer)
    return int(m.group(1)) if m else None


def _arithmetic_turn(rng: random.Random, previous: Optional[int]) -> Turn:
    if previous is not None and 0 <= previous < 100 and rng.random() < 0.5:
        if rng.random() < 0.6 and previous < 99:
            b = rng.randint(1, 99 - previous)
            return f'Add {b} to that.', add_answer(previous, b)
        if previous > 0:
            b = rng.randint(0, previous)
            return f'Subtract {b} from that.', sub_answer(previous, b)
    kind = rng.random()
    if kind < 0.5:
        a = rng.randint(0, 99)
        b = rng.randint(0, 99 - a)
        return add_question(a, b, rng), add_answer(a, b)
    if kind < 0.85:
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        return sub_question(a, b, rng), sub_answer(a, b)
    a = rng.randint(0, 99)
    b = rng.randint(0, 99 - a)
    return f'{a} 加 {b} 等于几？', f'{a} 加 {b} 等于 {a + b}。'


def random_turn(rng: random.Random, previous: Optional[int] = None) -> Turn:
    """One (question, answer) turn; `previous` enables follow-ups on the last result."""
    kind = rng.random()
    if kind < 0.5:
        return _arithmetic_turn(rng, previous)
    if kind < 0.8:
        word = rng.choice(WORDS)
        return reverse_question(word, rng), reverse_answer(word)
    if kind < 0.9:
        a = rng.randint(0, 20)
        b = a + rng.randint(1, 8)
        return count_question(a, b, rng), count_answer(a, b)
    pick = rng.random()
    if pick < 0.45:
        return rng.choice(GREETINGS_EN), GREETING_REPLY
    if pick < 0.8:
        return rng.choice(WHO_EN), WHO_REPLY
    return rng.choice(GREETINGS_ZH), GREETING_REPLY_ZH


def random_dialogue(rng: random.Random, max_turns: int = 4) -> List[Turn]:
    turns, previous = [], None
    for _ in range(rng.randint(1, max_turns)):
        question, answer = random_turn(rng, previous)
        turns.append((question, answer))
        previous = result_of(answer)
    return turns


def dialogues(n: int, seed: int = 0, max_turns: int = 4) -> List[List[Turn]]:
    rng = random.Random(seed)
    return [random_dialogue(rng, max_turns) for _ in range(n)]
