"""The project's own preference data set: generated, so the default run needs no third-party text.

    python -m training.default_data --output_dir /tmp/rewardspeed-data        # train.jsonl + test.jsonl
    python -m training.default_data --output_dir /tmp/hard --tasks binding,comparison,arithmetic

Every row is `{"prompt", "chosen", "rejected"}` text in the hh-rlhf turn format (`prompt + response` is the
sequence the reward model reads). The chosen response is right because of what the prompt says, never
because of how the response looks. The default tasks (`DEFAULT_TASKS`):

    - fact: two people and one attribute each are stated; the question asks for one person's attribute; the
      rejected answer states a value the prompt never mentions (an invented, ungrounded answer).
    - membership: a box's contents are listed; is a given object in the box? Yes or no.
    - instruction: write a word in capital or in lowercase letters, or repeat it two, three or four times.

Harder tasks, kept out of the default because SmolLM2-135M does not learn them within the default run's
budget (a few hundred pairs): `binding` (the rejected answer gives the OTHER person's stated value),
`comparison` (who of two is older/younger, from their ages) and `arithmetic` (a sum of two numbers below 50;
the rejected total is off by 1-3).

Rows come in **twins** (minimal pairs): the second row of a twin changes only the prompt (the stated value,
the box's contents or the instruction) so that its chosen response is the first row's rejected response and
vice versa. Every response text therefore occurs exactly as often chosen as rejected, in each split, so any
score that reads only the response (bag of words, length, a classifier on the response text) is exactly at
chance; only a reward that relates the response to the prompt can beat it. Twins are never split between
train and test.

Held-out generalisation: the test split uses names, cities, pets, colours, jobs, objects and words that never
occur in train, and sums whose operand pairs never occur in train. The word lists are split by position once
(not by `seed`), so every seed holds out the same vocabulary; `seed` decides only which rows are drawn.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

PROMPT_TEMPLATE = "\n\nHuman: {question}\n\nAssistant:"

NAMES = (
    "Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Amy", "Dan", "Lily", "Noah",
    "Emma", "Jack", "Ruth", "Omar", "Nina", "Paul", "Sara", "Hugo", "Lena", "Ivan", "Rosa", "Carl", "Anna",
    "Mark", "Elsa", "Alan", "Maya", "Owen", "Kate", "Luke", "Iris", "Adam", "Jane", "Kurt", "Tara", "Eric",
    "Dora", "Fred", "Gina", "Hans", "Jill", "Karl", "Lucy", "Nils", "Olga", "Pete", "Rita", "Seth", "Tina",
    "Vera", "Walt", "Yara", "Zack", "Beth", "Cole", "Dina",
)  # fmt: skip
CITIES = (
    "Oslo", "Lima", "Paris", "Cairo", "Rome", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna", "Prague",
    "Lisbon", "Athens", "Moscow", "Seoul", "Delhi", "Nairobi", "Sydney", "Toronto", "Chicago", "Boston",
    "Denver", "Warsaw", "Munich", "Zurich", "Geneva", "Milan", "Naples", "Quito", "Havana", "Bogota",
    "Manila", "Hanoi", "Dakar", "Accra", "Tunis",
)  # fmt: skip
PETS = (
    "cat", "dog", "rabbit", "parrot", "hamster", "turtle", "goldfish", "horse", "goat", "pony", "ferret",
    "lizard", "snake", "duck", "pig", "sheep", "mouse", "frog", "owl", "canary",
)  # fmt: skip
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey",
    "gold", "silver", "violet", "teal", "beige",
)  # fmt: skip
JOBS = (
    "teacher", "doctor", "baker", "pilot", "farmer", "nurse", "lawyer", "painter", "chef", "driver",
    "dentist", "writer", "plumber", "singer", "judge", "banker", "sailor", "tailor", "miner", "barber",
)  # fmt: skip
OBJECTS = (
    "cup", "key", "pen", "book", "lamp", "coin", "ring", "shoe", "hat", "sock", "brush", "comb", "fork",
    "spoon", "plate", "ball", "doll", "map", "card", "bell", "drum", "kite", "box", "rope", "bag", "watch",
    "glove", "scarf", "candle", "mirror", "clock", "phone", "knife", "bottle", "stamp", "button",
)  # fmt: skip
WORDS = (
    "river", "apple", "stone", "cloud", "table", "garden", "window", "bread", "music", "forest", "bridge",
    "harbor", "pencil", "ocean", "summer", "winter", "planet", "mountain", "pebble", "muffin", "letter",
    "market", "dragon", "castle", "engine", "rocket", "basket", "pillow", "tiger", "oyster", "carpet",
    "ladder", "guitar", "island", "butter", "meadow", "shadow", "thunder", "violin", "wallet", "anchor",
    "blanket", "compass", "camera", "cherry", "circle", "cotton", "desert", "insect", "feather", "finger",
    "flower", "ginger", "hammer", "helmet", "honey", "jacket", "jungle", "kettle", "kitten", "lemon",
    "journey", "magnet", "marble", "lobster", "monkey", "needle", "orbit", "paper", "noodle", "pepper",
    "pirate", "pocket", "puzzle", "rainbow", "ribbon", "saddle", "salmon", "school", "sponge", "spider",
    "sugar", "temple", "tomato", "tunnel", "turkey", "valley", "wagon", "walnut", "whistle", "wizard",
    "quilt", "zebra", "blossom", "cactus", "velvet", "banana", "lantern", "pumpkin", "hollow",
)  # fmt: skip

# (statement, question, answer) templates of the fact task, and the values each relation draws from.
RELATIONS = (
    ("{name} lives in {value}.", "Where does {name} live?", "{name} lives in {value}.", CITIES),
    ("{name} has a pet {value}.", "What pet does {name} have?", "{name} has a {value}.", PETS),
    ("{name} likes the colour {value}.", "Which colour does {name} like?", "{name} likes {value}.", COLOURS),
    ("{name} works as a {value}.", "What is {name}'s job?", "{name} is a {value}.", JOBS),
)

CASE_TEMPLATES = (
    "Write the word {word} in {case} letters.",
    "Spell {word} in {case} letters.",
    "Give me the word {word} in {case} letters.",
    "Type {word} using {case} letters.",
)
REPEAT_TEMPLATES = (
    "Repeat the word {word} {count} times.",
    "Say {word} {count} times.",
    "Write {word} {count} times.",
)
REPEAT_COUNTS = {2: "two", 3: "three", 4: "four"}

DEFAULT_TASKS = ("fact", "membership", "instruction")
HELD_OUT_EVERY = 4  # every 4th entry of each word list (and a quarter of the sums) is test-only
ARITHMETIC_RANGE = range(2, 50)
AGE_RANGE = range(18, 90)

Row = dict[str, str]
Twin = tuple[Row, Row]


def held_out_split(values: Sequence[str], split: str) -> tuple[str, ...]:
    """The part of a word list a split may use: every `HELD_OUT_EVERY`-th entry is test-only.

    >>> held_out_split(("a", "b", "c", "d", "e"), "test")
    ('d',)
    """
    in_test = [index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for index in range(len(values))]
    return tuple(value for value, test in zip(values, in_test, strict=True) if test == (split == "test"))


def sum_in_split(first: int, second: int, split: str) -> bool:
    """Whether the sum of `first` and `second` (in either order) belongs to `split`; a fixed quarter of the
    operand pairs, picked by a hash, is test-only."""
    low, high = sorted((first, second))
    return (zlib.crc32(f"{low}+{high}".encode()) % HELD_OUT_EVERY == 0) == (split == "test")


def make_row(question: str, chosen: str, rejected: str) -> Row:
    return {
        "prompt": PROMPT_TEMPLATE.format(question=question),
        "chosen": " " + chosen,
        "rejected": " " + rejected,
    }


def two_facts_row(
    relation: tuple, asked: str, other: str, asked_first: bool, values: tuple[str, str, str]
) -> Row:
    """One row about two people: `values` = (asked person's value, other person's value, rejected value);
    the chosen answer states the asked person's value, the rejected one the rejected value."""
    statement, question, answer, _ = relation
    asked_value, other_value, rejected_value = values
    facts = [statement.format(name=asked, value=asked_value), statement.format(name=other, value=other_value)]
    if not asked_first:
        facts.reverse()
    return make_row(
        " ".join([*facts, question.format(name=asked)]),
        answer.format(name=asked, value=asked_value),
        answer.format(name=asked, value=rejected_value),
    )


def fact_twin(rng: random.Random, split: str) -> Twin:
    """Grounded vs invented: the rejected value is one the prompt does not state."""
    relation = rng.choice(RELATIONS)
    asked, other = rng.sample(held_out_split(NAMES, split), 2)
    first_value, second_value, other_value = rng.sample(held_out_split(relation[3], split), 3)
    asked_first = rng.random() < 0.5
    return (
        two_facts_row(relation, asked, other, asked_first, (first_value, other_value, second_value)),
        two_facts_row(relation, asked, other, asked_first, (second_value, other_value, first_value)),
    )


def binding_twin(rng: random.Random, split: str) -> Twin:
    """The rejected value is stated too, but for the other person: only binding name to value tells."""
    relation = rng.choice(RELATIONS)
    asked, other = rng.sample(held_out_split(NAMES, split), 2)
    first_value, second_value = rng.sample(held_out_split(relation[3], split), 2)
    asked_first = rng.random() < 0.5
    return (
        two_facts_row(relation, asked, other, asked_first, (first_value, second_value, second_value)),
        two_facts_row(relation, asked, other, asked_first, (second_value, first_value, first_value)),
    )


def membership_twin(rng: random.Random, split: str) -> Twin:
    objects = held_out_split(OBJECTS, split)
    *contents, absent = rng.sample(objects, 4)
    asked_index = rng.randrange(3)

    def row(box: list[str], present: bool) -> Row:
        question = f"The box holds a {box[0]}, a {box[1]} and a {box[2]}. Is there a {contents[asked_index]} in the box?"
        yes, no = "Yes, it is in the box.", "No, it is not in the box."
        return make_row(question, yes if present else no, no if present else yes)

    swapped = list(contents)
    swapped[asked_index] = absent
    return row(contents, present=True), row(swapped, present=False)


def comparison_twin(rng: random.Random, split: str) -> Twin:
    first, second = rng.sample(held_out_split(NAMES, split), 2)
    older_age, younger_age = sorted(rng.sample(AGE_RANGE, 2), reverse=True)
    asks_older = rng.random() < 0.5
    word = "older" if asks_older else "younger"

    def row(first_age: int, second_age: int) -> Row:
        first_wins = (first_age > second_age) == asks_older
        winner, loser = (first, second) if first_wins else (second, first)
        question = f"{first} is {first_age} years old. {second} is {second_age} years old. Who is {word}?"
        return make_row(question, f"{winner} is {word}.", f"{loser} is {word}.")

    return row(older_age, younger_age), row(younger_age, older_age)


def arithmetic_twin(rng: random.Random, split: str) -> Twin:
    while True:
        first, second = rng.choice(ARITHMETIC_RANGE), rng.choice(ARITHMETIC_RANGE)
        offset = rng.choice((-3, -2, -1, 1, 2, 3))
        other = second + offset
        if (
            other in ARITHMETIC_RANGE
            and sum_in_split(first, second, split)
            and sum_in_split(first, other, split)
        ):
            break

    def row(addend: int, wrong_total: int) -> Row:
        return make_row(
            f"What is {first} + {addend}?",
            f"The answer is {first + addend}.",
            f"The answer is {wrong_total}.",
        )

    return row(second, first + other), row(other, first + second)


def instruction_twin(rng: random.Random, split: str) -> Twin:
    word = rng.choice(held_out_split(WORDS, split))
    if rng.random() < 0.5:
        template = rng.choice(CASE_TEMPLATES)
        return (
            make_row(template.format(word=word, case="capital"), word.upper(), word),
            make_row(template.format(word=word, case="lowercase"), word, word.upper()),
        )
    template = rng.choice(REPEAT_TEMPLATES)
    first_count, second_count = rng.sample(sorted(REPEAT_COUNTS), 2)

    def row(count: int, other_count: int) -> Row:
        return make_row(
            template.format(word=word, count=REPEAT_COUNTS[count]),
            " ".join([word] * count),
            " ".join([word] * other_count),
        )

    return row(first_count, second_count), row(second_count, first_count)


TWIN_MAKERS: dict[str, Callable[[random.Random, str], Twin]] = {
    "fact": fact_twin,
    "membership": membership_twin,
    "instruction": instruction_twin,
    "binding": binding_twin,
    "comparison": comparison_twin,
    "arithmetic": arithmetic_twin,
}


def generate_rows(num_rows: int, split: str, seed: int, tasks: Sequence[str] = DEFAULT_TASKS) -> list[Row]:
    """`num_rows` distinct rows (rounded up to whole twins) of one split, the tasks in turn, shuffled.

    Deterministic for a given (num_rows, split, seed, tasks). A twin that repeats an earlier row is drawn
    again, so no row occurs twice (a prompt may, with another rejected response).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not tasks or not set(tasks) <= set(TWIN_MAKERS):
        raise ValueError(f"tasks must be a non-empty subset of {list(TWIN_MAKERS)}, got {list(tasks)}")
    rng = random.Random(f"{seed}-{split}")
    rows: list[Row] = []
    seen: set[tuple[str, str, str]] = set()
    num_twins = (num_rows + 1) // 2
    for index in range(num_twins):
        make_twin = TWIN_MAKERS[tasks[index % len(tasks)]]
        for _attempt in range(1000):
            twin = make_twin(rng, split)
            keys = [(row["prompt"], row["chosen"], row["rejected"]) for row in twin]
            if not seen.intersection(keys):
                break
        else:
            raise ValueError(f"cannot draw {num_twins} distinct {split} twins; ask for fewer rows")
        seen.update(keys)
        rows.extend(twin)
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_default_dataset(
    output_dir: str | Path,
    num_train: int = 4000,
    num_test: int = 400,
    seed: int = 1234,
    tasks: Sequence[str] = DEFAULT_TASKS,
) -> dict[str, str]:
    """Write `train.jsonl` and `test.jsonl` into `output_dir`; returns `{"train": path, "test": path}`.

    The folder is a data source with its own evaluation split (`--data_path output_dir`).
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"train": output / "train.jsonl", "test": output / "test.jsonl"}
    write_jsonl(generate_rows(num_train, "train", seed, tasks), paths["train"])
    write_jsonl(generate_rows(num_test, "test", seed, tasks), paths["test"])
    return {split: str(path) for split, path in paths.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder that receives train.jsonl and test.jsonl")
    parser.add_argument("--num_train", type=int, default=4000, help="training rows (rounded up to twins)")
    parser.add_argument("--num_test", type=int, default=400, help="held-out rows (rounded up to twins)")
    parser.add_argument("--seed", type=int, default=1234, help="decides which rows are drawn")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated, drawn in turn; any of {','.join(TWIN_MAKERS)}",
    )
    args = parser.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    paths = write_default_dataset(args.output_dir, args.num_train, args.num_test, args.seed, tasks)
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
