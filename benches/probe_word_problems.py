"""A direction check of the complexity classifier on prompts of a kind it was not trained on.

Eighteen grade-school word problems written for this check (not from any dataset), each with the number of
arithmetic steps its solution takes. There are no weak/strong outcomes, so this gives no APGR: it says only
how closely a model's ranking of these prompts follows their step count, beside prompt length's. The
problems were written with the harder ones longer, so length follows the steps closely here by construction;
on real traffic of this kind it will follow them less well.

    .venv/bin/python benches/probe_word_problems.py [MODEL.json ...]     # default: the shipped model
"""

from __future__ import annotations

import sys

import numpy as np
from fastroute import classifier

PROBLEMS = [
    (1, 'Tom has 5 apples. He buys 3 more. How many apples does Tom have now?'),
    (1, 'A box holds 12 pencils. How many pencils are in 4 boxes?'),
    (1, 'Sara had $20 and spent $7 on lunch. How much money does she have left?'),
    (1, 'There are 30 students in a class and 18 are girls. How many boys are in the class?'),
    (
        2,
        'A baker makes 48 muffins and sells them in packs of 6. Each pack costs $4. How much money does he make '
        'if he sells all the packs?',
    ),
    (
        2,
        'Lena reads 15 pages a day for 6 days and then 20 pages on the seventh day. How many pages did she read that week?',
    ),
    (2, 'A farmer has 3 fields with 40 cows each. He sells 25 cows. How many cows does he have left?'),
    (2, 'Mark earns $12 an hour and works 8 hours a day. How much does he earn in 5 days?'),
    (
        3,
        'A store sells notebooks for $3 each and pens for $1.50 each. Amy buys 4 notebooks and 6 pens and pays '
        'with a $50 bill. How much change does she get?',
    ),
    (
        3,
        'A train travels 60 miles per hour for 2 hours, then 45 miles per hour for 3 hours. What is the total '
        'distance it travels, and how much farther did it go in the second part than in the first?',
    ),
    (
        3,
        'Jenny has twice as many stickers as Paul. Paul has 14 stickers more than Kim, who has 9. How many '
        'stickers do the three of them have together?',
    ),
    (
        3,
        'A recipe needs 3 eggs for every 2 cups of flour. Maria wants to use 10 cups of flour, and eggs come in '
        'cartons of 12. How many cartons does she need to buy?',
    ),
    (
        4,
        'A school orders 25 boxes of markers with 8 markers in each box. It gives 6 markers to each of 28 '
        'classrooms and keeps the rest in storage. Then 15 markers in storage turn out to be dry and are thrown '
        'away. How many good markers are left in storage?',
    ),
    (
        4,
        'John runs 3 miles on Monday, twice that on Tuesday, and 2 miles less than Tuesday on Wednesday. On '
        'Thursday he runs half of what he ran on the first three days combined. How many miles did he run over '
        'the four days?',
    ),
    (
        5,
        'A water tank holds 1,200 liters. It is 3/4 full. A pump removes 45 liters per minute for 8 minutes, and '
        'then a hose adds 30 liters per minute for 12 minutes. After that, 20% of the water left is used to '
        'water a garden. How many liters remain in the tank?',
    ),
    (
        5,
        'Kate buys 3 shirts at $18 each and 2 pairs of jeans at $35 each. The store gives 15% off the whole '
        'purchase, and then she pays 8% sales tax on the discounted price. She also uses a $10 gift card after '
        'tax. How much does she pay in cash?',
    ),
    (
        6,
        'A company has 240 employees. One third work in sales, a quarter of the rest work in support, and the '
        'others work in engineering. Next year sales grows by 10%, support shrinks by 6 people, and engineering '
        'doubles. The company then moves 5% of all employees into a new research team taken equally from sales '
        'and engineering. How many people work in engineering after the move?',
    ),
    (
        6,
        'Three friends share the cost of a trip. The hotel costs $120 per night for 4 nights, gas costs $0.25 per '
        'mile for 560 miles, and food costs $35 per person per day for 5 days. One friend pays $100 more than '
        'each of the other two, who pay the same amount. How much does each of the other two friends pay?',
    ),
]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by position; there are ties only in the step counts)."""
    ra = np.argsort(np.argsort(a, kind='stable'), kind='stable')
    rb = np.argsort(np.argsort(b, kind='stable'), kind='stable')
    return float(np.corrcoef(ra, rb)[0, 1])


def main(paths: list[str]) -> int:
    steps = np.array([s for s, _ in PROBLEMS], float)
    length = np.array([len(p) for _, p in PROBLEMS], float)
    bodies = [classifier.chat_body(p) for _, p in PROBLEMS]
    print(f'{len(PROBLEMS)} word problems, 1 to 6 steps; Spearman rank correlation with the step count')
    print(f'{"router":<48} {"vs steps":>9} {"vs length":>10}')
    print(f'{"prompt length":<48} {spearman(length, steps):>9.3f} {1.0:>10.3f}')
    for path in paths or [str(classifier.default_model_path())]:
        scores = np.array(classifier.load_model(path).classifier.score_many(bodies), float)
        name = path if len(path) <= 48 else '…' + path[-47:]
        print(f'{name:<48} {spearman(scores, steps):>9.3f} {spearman(scores, length):>10.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
