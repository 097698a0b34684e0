"""Generate the calibration corpus shipped with lmdeploy (lmdeploy/lite/data/calib_corpus.txt).

    python tools/gen_calib_corpus.py [--out lmdeploy/lite/data/calib_corpus.txt] [--check]

`python -m lmdeploy.lite.apis.kv_qparams` uses this text by default (`--calib_dataset builtin`),
so int8 KV calibration works without network access. The text is prose-like: short articles,
letters, dialogues, how-tos, lists, tables, a little Python code and Chinese paragraphs, built
from templates and word lists written for this project. Everything is drawn from one seeded
`random.Random`, so the output is the same bytes on every run and Python 3 version (`--check`
compares it with the file in the package). It is generated, not collected: no third-party text
is in it, and it is distributed under the same license as the repository.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, 'lmdeploy', 'lite', 'data', 'calib_corpus.txt')
TARGET_BYTES = 460_000  # well under 1 MB; ~100k tokens for a Llama tokenizer
SEED = 0

WORDS: Dict[str, List[str]] = {
    'name': 'Ada Bruno Carmen Daniel Elena Farid Grace Hiro Ines Jonas Kavya Liam Mei Nadia Omar '
            'Priya Quentin Rosa Samuel Tomas Uma Victor Wen Ximena Yusuf Zoe'.split(),
    'place': 'the harbor|the old library|the market square|the train station|the hill above town|'
             'the river bank|the school garden|the village bakery|the night market|the museum|'
             'the mountain pass|the quiet beach|the city park|the workshop|the lighthouse'.split('|'),
    'city': 'Lisbon Nairobi Osaka Quito Tallinn Hanoi Perth Oslo Cusco Dakar Kyoto Porto Bergen '
            'Valparaiso Tbilisi Chengdu Hangzhou Kunming Xiamen Lhasa'.split(),
    'animal': 'fox heron otter sparrow badger goat tortoise crane lynx beetle dolphin owl hare '
              'salmon moth yak'.split(),
    'food': 'barley soup|rye bread|grilled fish|lentil stew|rice noodles|apple pie|dumplings|'
            'roasted peppers|goat cheese|plum jam|tomato salad|green tea|spiced porridge|'
            'mushroom risotto|corn tortillas'.split('|'),
    'object': 'lantern compass notebook kettle bicycle telescope violin map umbrella clock radio '
              'hammer ladder basket typewriter microscope'.split(),
    'adj': 'quiet bright narrow ancient careful restless gentle stubborn curious patient heavy '
           'fragile generous sudden steady humble vivid hollow'.split(),
    'job': 'teacher baker engineer nurse carpenter librarian farmer pilot painter chemist sailor '
           'gardener translator mechanic surveyor potter'.split(),
    'field': 'chemistry astronomy linguistics geology botany statistics economics architecture '
             'music theory cartography ecology mathematics'.split(),
    'weather': 'a cold wind from the north|light rain all morning|a thick grey fog|clear skies and '
               'warm sun|a sudden summer storm|the first snow of the year|a dry and dusty '
               'afternoon|soft drizzle at dusk'.split('|'),
    'feeling': 'relieved surprised tired hopeful uneasy proud calm amused grateful restless'.split(),
    'season': 'spring summer autumn winter'.split(),
    'material': 'oak clay copper glass wool stone paper steel bamboo linen'.split(),
    'verb': 'repaired painted measured studied carried cleaned sorted tested planted '
            'translated sketched weighed'.split(),
    'color': 'red amber green blue violet grey white black golden silver'.split(),
    'month': 'January February March April May June July August September October November '
             'December'.split(),
}

EN_SENTENCES = [
    '{name} walked to {place} before sunrise, carrying a {adj} {object}.',
    'In {city}, the {season} brought {weather}, and most people stayed indoors.',
    'The {job} explained that the {material} frame lasts longer if it is kept dry.',
    'Nobody expected the {animal} to return, but it did, every evening at six.',
    'By {month} the garden had changed completely; the {color} flowers were gone.',
    '{name} had studied {field} for {n} years and still found it {adj}.',
    'We ate {food} and talked about the {adj} winters of our childhood.',
    'The report lists {n} bridges, {m} of which were built from {material}.',
    'It is easy to forget how much work goes into a single loaf of bread.',
    'She {verb} the old {object} and put it back on the shelf without a word.',
    'When the {weather} arrived, the fishermen pulled their boats onto the sand.',
    'The museum in {city} keeps a {color} {object} that is almost {n} hundred years old.',
    'A {adj} silence followed, broken only by the call of a {animal}.',
    'Most of the village turned out to help when the {job} fell ill.',
    '{name} wrote down every number, because memory is less reliable than ink.',
    'The path to {place} is {n} kilometres long and climbs steadily the whole way.',
    'According to the {job}, the secret is patience rather than talent.',
    'Children in {city} learn to swim before they learn to ride a bicycle.',
    'They {verb} {n} samples that week and found nothing unusual in any of them.',
    'The recipe calls for {n} cups of flour, a pinch of salt and a little honey.',
    'After the meeting, {name} felt {feeling} and a little {adj}.',
    'There was {weather}, so the lesson moved from {place} to the kitchen.',
    'A good {object} is worth more than a drawer full of cheap ones.',
    'The letter from {city} arrived {n} days late, its envelope stained with rain.',
    'Some questions in {field} have waited centuries for an answer.',
    '{name} and {name2} argued about the map until both of them laughed.',
    'The {animal} watched us from the reeds, perfectly still.',
    'Prices at the market rose by {n} percent over the {season}.',
    'If the {material} cracks, the whole structure must be checked again.',
    'Every {month}, the town holds a festival with music, lanterns and {food}.',
    'The engine coughed twice, then settled into a {adj} rhythm.',
    'It took {n} attempts before the experiment gave the same result twice.',
    'Her grandmother used to say that a {color} sky in the morning means rain.',
    'The old road to {city} is closed, but the new one is faster anyway.',
    'He {verb} the {object} carefully, as if it might break at a touch.',
    'The committee met on {n} {month} and voted to keep the library open late.',
    'What surprised {name} most was how {adj} the {job} seemed in person.',
    'Light came through the {color} glass and spread across the floor.',
]

EN_TOPICS: Dict[str, List[str]] = {
    'science': [
        'Water expands when it freezes, which is why pipes burst in a hard winter.',
        'A prism splits white light because each colour bends by a slightly different angle.',
        'The average of {n} measurements is steadier than any one of them alone.',
        'Plants turn carbon dioxide and water into sugar, using the energy of sunlight.',
        'Sound travels faster in water than in air, and faster still in steel.',
        'A pendulum of the same length keeps the same period, however wide it swings.',
        'Small errors can grow quickly when a calculation is repeated {n} times.',
        'Salt lowers the freezing point of water, so roads are salted before a frost.',
        'The moon shows the same face to the earth because its rotation is locked to its orbit.',
        'Heat flows from the warmer body to the colder one until both reach the same temperature.',
    ],
    'computing': [
        'A cache keeps recent results close at hand, so the slow path is taken less often.',
        'The program read {n} records, sorted them by date and wrote a short summary.',
        'Rounding to the nearest even number keeps the total error from drifting upwards.',
        'An eight-bit integer holds values from minus 128 to 127.',
        'Testing against an independent reference catches mistakes that a review can miss.',
        'The server answered {n} requests per second before the disk became the bottleneck.',
        'A scale factor maps the largest value onto the largest integer the format can hold.',
        'When memory runs short, the least recently used entries are evicted first.',
        'The function returns early if the input list is empty.',
        'Each block of the table holds {n} rows and a pointer to the next block.',
    ],
    'travel': [
        'The night train to {city} leaves at ten and arrives just after breakfast.',
        'Pack light: a warm coat, good shoes and a notebook are enough.',
        'From the ferry you can see the lighthouse long before the town appears.',
        'The guesthouse served {food} every morning, with strong coffee on the side.',
        'We crossed the border at dawn, when the road was still empty.',
        'In the mountains the weather changes quickly, so leave early and turn back in time.',
        'The bus stopped in every village, and the trip took {n} hours instead of three.',
        'The old quarter of {city} is best explored on foot, without a plan.',
    ],
    'cooking': [
        'Soak the beans overnight and cook them slowly with an onion and a bay leaf.',
        'Knead the dough for ten minutes, then leave it covered in a warm place.',
        'A sharp knife is safer than a dull one, because it does not slip.',
        'Toast the spices in a dry pan until they smell warm and nutty.',
        'Add the {food} at the end, so that it keeps its colour and bite.',
        'Taste as you go; salt is easier to add than to take away.',
        'The sauce needs {n} minutes on a low flame and a patient cook.',
        'Let the bread cool before slicing it, or the crumb turns gummy.',
    ],
    'history': [
        'The canal was dug by hand over {n} years and opened in {year}.',
        'Records from {year} describe a winter so cold that the harbor froze.',
        'The town charter, signed in {year}, granted the market its weekly day.',
        'Before the railway, goods from {city} travelled by cart for weeks.',
        'The first printing press in the region arrived in {year} and changed everything.',
        'Old maps show the river further east; it moved after the flood of {year}.',
        'Merchants kept their accounts in two ledgers, one for each currency.',
        'The bridge survived three wars and was finally rebuilt in {year}.',
    ],
}

ZH_SENTENCES = [
    '{zname}每天早上六点起床，先去{zplace}散步，然后回家做早饭。',
    '今年{zseason}来得特别早，{zplace}的树叶一夜之间全变黄了。',
    '这家小店的{zfood}很有名，周末常常要排{n}分钟的队。',
    '{zname}说，学习{zfield}最重要的不是聪明，而是耐心。',
    '火车晚点了{n}个小时，大家却一点也不着急，在车厢里聊天、下棋。',
    '老师让我们把{n}个数字从小到大排好，再算出它们的平均值。',
    '雨停以后，{zanimal}从草丛里走出来，慢慢地穿过小路。',
    '{zname}把旧{zobject}修好了，又送给了隔壁的邻居。',
    '我们在{zplace}遇见了一位{zjob}，他给我们讲了很多过去的故事。',
    '这座桥建于{year}年，至今已经有很多年的历史。',
    '天气预报说明天有大风，出门前记得多穿一件衣服。',
    '她一边听音乐，一边整理书架上的{n}本书。',
    '村子里的人都知道，{zseason}的时候山上的泉水最甜。',
    '这个实验重复了{n}次，每一次的结果都差不多。',
    '妈妈做的{zfood}总是比饭馆里的好吃，因为她放了很多心思。',
    '图书馆晚上开到十点，很多学生在那里复习功课。',
    '{zname}第一次去{zcity}，就被那里的老街和小巷迷住了。',
    '如果数值太大，就先除以一个比例因子，再四舍五入成整数。',
    '傍晚的江边很安静，只有几只{zanimal}在水面上飞来飞去。',
    '会议决定下个月增加{n}辆公交车，方便大家上下班。',
    '爷爷常说，做事要认真，说话要算数。',
    '市场上的{zfood}比上周便宜了一些，买的人也多了。',
    '{zname}在日记里写道：今天虽然很累，但是心里很高兴。',
    '这条山路长{n}公里，一路上都能看到美丽的风景。',
]

ZH_WORDS: Dict[str, List[str]] = {
    'zname': '小明 小红 李华 王芳 张伟 刘洋 陈静 赵磊 孙丽 周杰 吴敏 郑强'.split(),
    'zplace': '公园 河边 图书馆 菜市场 学校 山脚下 老街 码头 广场 小树林'.split(),
    'zseason': '春天 夏天 秋天 冬天'.split(),
    'zfood': '饺子 面条 包子 米饭 豆腐 馄饨 月饼 烤鸭 粥 汤圆'.split(),
    'zfield': '数学 物理 化学 历史 地理 音乐 美术 生物 天文 经济学'.split(),
    'zanimal': '小鸟 白鹭 小猫 松鼠 燕子 蝴蝶 鸭子 兔子'.split(),
    'zobject': '自行车 收音机 台灯 手表 雨伞 书包 茶壶 风筝'.split(),
    'zjob': '老师 医生 农民 工程师 司机 厨师 画家 邮递员'.split(),
    'zcity': '杭州 成都 西安 昆明 厦门 苏州 青岛 桂林'.split(),
}

CODE_SNIPPETS = [
    'def mean(values):\n    """The arithmetic mean of a non-empty list."""\n'
    '    return sum(values) / len(values)\n',
    'def clamp(x, low, high):\n    return max(low, min(high, x))\n',
    'for i in range({n}):\n    if i % 3 == 0:\n        print(i, "fizz")\n',
    'counts = {{}}\nfor word in text.split():\n    counts[word] = counts.get(word, 0) + 1\n',
    'with open("notes.txt", encoding="utf-8") as f:\n    lines = [line.strip() for line in f]\n',
    'def quantize(x, scale):\n    q = round(x / scale)\n    return max(-128, min(127, q))\n',
]


class Writer:
    """Fills templates from the word lists with one seeded generator."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, items):
        return items[self.rng.randrange(len(items))]

    def fill(self, template: str) -> str:
        rng = self.rng
        names = rng.sample(WORDS['name'], 2)
        values = {key: self.pick(words) for key, words in WORDS.items()}
        values.update({key: self.pick(words) for key, words in ZH_WORDS.items()})
        values.update(name=names[0], name2=names[1], n=rng.randint(2, 90), m=rng.randint(1, 9),
                      year=rng.randint(1620, 1990))
        return template.format(**values)

    def en_paragraph(self, topic: str) -> str:
        pool = EN_TOPICS[topic]
        n = self.rng.randint(3, 7)
        return ' '.join(self.fill(self.pick(pool if self.rng.random() < 0.4 else EN_SENTENCES))
                        for _ in range(n))

    def zh_paragraph(self) -> str:
        return ''.join(self.fill(self.pick(ZH_SENTENCES)) for _ in range(self.rng.randint(3, 6)))

    # -- documents --------------------------------------------------------------------------

    def article(self) -> str:
        topic = self.pick(sorted(EN_TOPICS))
        title = self.fill(f'{{adj}} notes on {topic} from {{city}}').title()
        paragraphs = [self.en_paragraph(topic) for _ in range(self.rng.randint(3, 6))]
        return f'# {title}\n\n' + '\n\n'.join(paragraphs)

    def letter(self) -> str:
        body = '\n\n'.join(self.en_paragraph(self.pick(sorted(EN_TOPICS)))
                           for _ in range(self.rng.randint(2, 3)))
        return self.fill('Dear {name},\n\n') + body + self.fill('\n\nWith warm wishes,\n{name2}')

    def dialogue(self) -> str:
        a, b = self.rng.sample(WORDS['name'], 2)
        lines = []
        for i in range(self.rng.randint(4, 8)):
            speaker = a if i % 2 == 0 else b
            lines.append(f'{speaker}: {self.fill(self.pick(EN_SENTENCES))}')
        return '\n'.join(lines)

    def how_to(self) -> str:
        topic = self.pick(['cooking', 'computing', 'travel'])
        steps = [f'{i + 1}. {self.fill(self.pick(EN_TOPICS[topic]))}'
                 for i in range(self.rng.randint(4, 7))]
        return f'How to get started with {topic}:\n\n' + '\n'.join(steps)

    def table(self) -> str:
        rows = ['| city | month | rainfall (mm) | visitors |', '| --- | --- | --- | --- |']
        for _ in range(self.rng.randint(4, 8)):
            rows.append(self.fill('| {city} | {month} | ') + f'{self.rng.uniform(5, 250):.1f} | '
                        f'{self.rng.randint(100, 99999)} |')
        return '\n'.join(rows)

    def code(self) -> str:
        intro = self.fill(self.pick(EN_TOPICS['computing']))
        return intro + '\n\n```python\n' + self.fill(self.pick(CODE_SNIPPETS)) + '```'

    def chinese(self) -> str:
        title = self.fill('{zcity}{zseason}随笔')
        return f'## {title}\n\n' + '\n\n'.join(self.zh_paragraph() for _ in range(self.rng.randint(2, 4)))

    def document(self) -> str:
        kinds: List[Callable[[], str]] = [self.article] * 5 + [self.letter] * 2 + [
            self.dialogue, self.dialogue, self.how_to, self.table, self.code] + [self.chinese] * 3
        return self.pick(kinds)()


def generate(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    """The corpus text: documents separated by blank lines, until `target_bytes` of UTF-8."""
    writer = Writer(seed)
    docs, size = [], 0
    while size < target_bytes:
        doc = writer.document()
        docs.append(doc)
        size += len(doc.encode('utf-8')) + 2
    return '\n\n'.join(docs) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT, help='where to write the corpus')
    parser.add_argument('--check', action='store_true',
                        help='compare with --out instead of writing it; exit 1 if they differ')
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        with open(args.out, encoding='utf-8') as f:
            same = f.read() == text
        print('up to date' if same else f'{args.out} differs from the generator output')
        return 0 if same else 1
    tmp = args.out + '.tmp'
    with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f'wrote {args.out}: {len(text.encode("utf-8"))} bytes, {len(text)} characters')
    return 0


if __name__ == '__main__':
    sys.exit(main())
