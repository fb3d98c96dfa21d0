"""SYNTHETIC PersonalWAB-format demo data (``dataset=demo_pwab``): shopping requests that a
user's purchase and review history makes solvable.

Nothing here is real: every product, store and review is made up from the lists below,
deterministically from a seed, and written in the official file format
(``user_instructions.json``, ``user_history_part_1.json``, ``all_products_part_1.json``)
so that it is read by the same loader as the real benchmark.

How the data is built
---------------------
* **Catalogue.** Every store sells every category in two lines, ``Lite`` (cheaper) and
  ``Pro`` (dearer): ``len(STORES) x len(CATEGORIES) x 2`` products (288), each with a
  title "<Store> <Model> <Line> <Category>", a price, a rating, features and a
  description shared by its category (so a query naming only the category matches every
  store's product about equally).
* **Users and preferences.** Each user is loyal to one store and one line (brand and
  price band) and writes every review in one style: a tone (enthusiastic, critical,
  practical) and a length (short: 2 sentences, long: 5). A user's purchases are the
  products of their store and line, one category after another in a random order, plus
  one purchase from another store in the early history (noise for retrieval).
* **Tasks.** After ``n_history`` purchases, each further purchase is one task (train
  tasks first, then test tasks), whose target is that purchase:
  - search: "I need a new <category>..." (the store is not named): a query that names the
    user's store and line finds the target at the top; the category alone ranks it among
    all stores' products;
  - recommend: the co-occurrence recommender, trained on the training-split histories of
    all users (``n_background_users`` extra users have a history and no tasks), ranks the
    unbought products of the user's store and line first when given the user's own ASINs;
  - review: the target review is written in the user's style about the target product.
* **Background users** get (store, line) round robin, so every pair of them has buyers.

Determinism: every random choice comes from a ``random.Random`` seeded with a string made
from ``seed`` and a fixed role; same arguments, same files.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

from fints_repro.errors import ConfigError

STORES = ("Trailpeak", "Nordvik", "Solvane", "Brightfield", "Kestrel", "Ambergrove",
          "Orbitek", "Fernway", "Halcyon", "Quillon", "Redwater", "Zephyra")
LINES = {"Lite": 0.7, "Pro": 1.4}
MODELS = ("Aero", "Stride", "Pulse", "Core", "Nova", "Vista", "Echo", "Summit", "Drift", "Arc")
CATEGORIES = (
    # main category, noun, base price, features
    ("Running Shoes", "pair of running shoes", 80, ("breathable mesh upper", "cushioned midsole")),
    ("Headphones", "wireless headphones", 90, ("noise cancelling", "long battery life")),
    ("Coffee Makers", "coffee maker", 60, ("programmable timer", "thermal carafe")),
    ("Backpacks", "backpack", 50, ("padded laptop sleeve", "water resistant fabric")),
    ("Yoga Mats", "yoga mat", 30, ("non-slip surface", "extra thick padding")),
    ("Desk Lamps", "desk lamp", 35, ("adjustable brightness", "flexible arm")),
    ("Water Bottles", "water bottle", 20, ("double wall insulation", "leak proof lid")),
    ("Keyboards", "mechanical keyboard", 70, ("hot swappable switches", "backlit keys")),
    ("Blenders", "blender", 55, ("stainless steel blades", "pulse function")),
    ("Tents", "camping tent", 120, ("quick setup poles", "rainfly included")),
    ("Watches", "fitness watch", 110, ("heart rate monitor", "sleep tracking")),
    ("Pillows", "memory foam pillow", 40, ("cooling gel layer", "washable cover")),
)
TONES = {
    "enthusiastic": {
        "rating": 5.0,
        "open": ("Absolutely love this {noun}!", "Wow, this {noun} is amazing!"),
        "body": ("The {feature} is fantastic!", "Best purchase I have made this year!",
                 "I use it every single day and it makes me happy!",
                 "Totally worth the ${price}!"),
    },
    "critical": {
        "rating": 3.0,
        "open": ("The {noun} is okay, but not great.", "This {noun} is fine, with flaws."),
        "body": ("The {feature} could be better.", "I expected more for ${price}.",
                 "It feels cheaper than the photos suggest.",
                 "After a few weeks some problems showed up."),
    },
    "practical": {
        "rating": 4.0,
        "open": ("Solid {noun} that does the job.", "A dependable {noun}."),
        "body": ("The {feature} works as described.", "Fair value at ${price}.",
                 "Setup took about ten minutes.", "No complaints after a month of use."),
    },
}
LENGTHS = {"short": 1, "long": 4}  # body sentences after the opening one
SEARCH_TASKS = ("I need a new {noun}. Can you find one for me?",
                "Looking for a {noun}, what can you find?",
                "Please search for a good {noun} for me.")
RECOMMEND_TASKS = ("Can you recommend something I might like?",
                   "What should I buy next? Give me some recommendations.",
                   "Please recommend a few products for me.")
REVIEW_TASKS = ("Please write a review for the {noun} I just bought.",
                "Help me write a review of this {noun}.")
DAY_MS = 86_400_000
START_MS = 1_600_000_000_000


def _asin(rng: random.Random) -> str:
    return "B0" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))


def catalogue(seed: int) -> list[dict[str, Any]]:
    """Every product's ``product_info`` (store x category x line order)."""
    rng = random.Random(f"{seed}|catalogue")
    products, seen = [], set()
    for store in STORES:
        for main, noun, base, features in CATEGORIES:
            for line, mult in LINES.items():
                asin = _asin(rng)
                while asin in seen:
                    asin = _asin(rng)
                seen.add(asin)
                model = rng.choice(MODELS)
                products.append({
                    "main_category": main,
                    "title": f"{store} {model} {line} {main}",
                    "average_rating": round(rng.uniform(3.6, 4.9), 1),
                    "rating_number": rng.randint(20, 5000),
                    "features": [features[0].capitalize(), features[1].capitalize()],
                    "description": [f"A {noun} with {features[0]} and {features[1]}."],
                    "price": round(base * mult * rng.uniform(0.9, 1.1), 2),
                    "store": store,
                    "categories": ["Demo", main],
                    "details": {"Brand": store, "Line": line},
                    "parent_asin": asin,
                })
    return products


def _noun(info: dict[str, Any]) -> str:
    return next(c[1] for c in CATEGORIES if c[0] == info["main_category"])


def write_review(rng: random.Random, info: dict[str, Any], tone: str, length: str) -> tuple[str, float]:
    """A review of ``info`` in a style; returns (text, rating)."""
    t = TONES[tone]
    cat = next(c for c in CATEGORIES if c[0] == info["main_category"])
    slots = {"noun": cat[1], "feature": rng.choice(cat[3]), "price": info["price"]}
    body = rng.sample(t["body"], LENGTHS[length])
    text = " ".join(s.format(**slots) for s in [rng.choice(t["open"]), *body])
    if length == "long":
        text += f" This is another {info['store']} product for me."
    return text, t["rating"]


def _user_id(rng: random.Random) -> str:
    return "A" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=27))


def generate_demo_pwab(*, n_users: int, n_background_users: int, n_history: int,
                       n_train_tasks: int, n_test_tasks: int, seed: int) -> dict[str, Any]:
    """The three files' contents: {"instructions", "history", "products"}."""
    n_own = n_history - 1 + n_train_tasks + n_test_tasks
    if n_history < 2 or n_own > len(CATEGORIES):
        raise ConfigError(
            f"dataset.demo_pwab: n_history={n_history} (>= 2, one of them from another store) "
            f"and {n_train_tasks} + {n_test_tasks} tasks need {n_own} products of the user's "
            f"store and line; there are {len(CATEGORIES)}")
    products = catalogue(seed)
    by_key = {(p["store"], p["details"]["Line"], p["main_category"]): p for p in products}
    combos = [(s, line) for s in STORES for line in LINES]
    styles = [(tone, length) for tone in TONES for length in LENGTHS]
    instructions: dict[str, list] = {"train": [], "test": []}
    history: dict[str, list] = {}

    def entry(rng, info, when, tone, length, split):
        text, rating = write_review(rng, info, tone, length)
        review = {"rating": rating, "title": f"{info['store']} {_noun(info)}", "text": text,
                  "parent_asin": info["parent_asin"], "timestamp": when}
        return {"product_info": info, "review": review, "split": split}

    plan_rng = random.Random(f"{seed}|users")
    task_combos = plan_rng.sample(combos, min(n_users, len(combos)))
    while len(task_combos) < n_users:
        task_combos.append(plan_rng.choice(combos))
    for u in range(n_users):
        rng = random.Random(f"{seed}|user|{u}")
        uid = _user_id(rng)
        store, line = task_combos[u]
        tone, length = styles[(u + seed) % len(styles)]
        cats = [c[0] for c in CATEGORIES]
        rng.shuffle(cats)
        own = [by_key[(store, line, c)] for c in cats[:n_own]]
        other = by_key[(rng.choice([s for s in STORES if s != store]), rng.choice(list(LINES)),
                        cats[-1])]
        early = own[: n_history - 1]
        early.insert(rng.randrange(1, n_history), other)  # never the very first purchase
        items = []
        day = rng.randint(0, 30)
        for info in early:
            day += rng.randint(3, 20)
            items.append(entry(rng, info, START_MS + day * DAY_MS, tone, length, "train"))
        types = ["search", "recommend", "review"]
        train_types = [types[(i + u) % 3] for i in range(n_train_tasks)]
        test_types = [types[i % 3] for i in range(n_test_tasks)]
        rng.shuffle(test_types)
        for split, kinds, targets in (("train", train_types, own[n_history - 1: n_history - 1 + n_train_tasks]),
                                      ("test", test_types, own[n_history - 1 + n_train_tasks:])):
            for kind, info in zip(kinds, targets):
                day += rng.randint(3, 20)
                when = START_MS + day * DAY_MS
                item = entry(rng, info, when, tone, length, split)
                items.append(item)
                noun = _noun(info)
                text = rng.choice({"search": SEARCH_TASKS, "recommend": RECOMMEND_TASKS,
                                   "review": REVIEW_TASKS}[kind]).format(noun=noun)
                instructions[split].append({
                    "user_id": uid, "task": text, "type": kind, "timestamp": when,
                    "target": {"product_info": info, "review": item["review"]}})
        history[uid] = items
    for b in range(n_background_users):
        rng = random.Random(f"{seed}|background|{b}")
        uid = _user_id(rng)
        store, line = combos[b % len(combos)]
        tone, length = rng.choice(styles)
        cats = rng.sample([c[0] for c in CATEGORIES], 8)
        day = rng.randint(0, 30)
        items = []
        for c in cats:
            day += rng.randint(3, 20)
            items.append(entry(rng, by_key[(store, line, c)], START_MS + day * DAY_MS, tone,
                               length, "train"))
        history[uid] = items
    return {"instructions": instructions, "history": history,
            "products": {p["parent_asin"]: p for p in products}}


NOTICE = ("SYNTHETIC data generated by fints_repro.data.demo_pwab: made-up products, stores "
          "and reviews in the PersonalWAB file format. Not the benchmark.\n")


def write_demo_pwab(folder: str | Path, **spec: Any) -> int:
    """Write the demo's files into ``folder``; returns the number of tasks."""
    data = generate_demo_pwab(**spec)
    folder = Path(folder)
    files = {"user_instructions.json": data["instructions"],
             "user_history_part_1.json": data["history"],
             "all_products_part_1.json": data["products"]}
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    (folder / "SYNTHETIC.txt").write_text(NOTICE)
    return sum(len(v) for v in data["instructions"].values())
