"""The built-in instruction data set: small Alpaca-format tasks whose answers the base model already knows.

Every record is ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` is ``""`` when the task
needs none, as in Alpaca). The answers come from :mod:`minipeft.builtin.facts`, which the built-in model
read during pretraining, or from the input itself (reverse, sort, count, pick a word), so the output is
determined by the instruction and input. What the pretrained model has *not* seen is the Alpaca prompt
layout and the terse answer style; learning those is what a minute of LoRA training shows.

Why 2,000 records: the tasks have a few hundred distinct answers each, so 2,000 unique (instruction,
input) pairs cover every fact table several times over in different phrasings, while one epoch at batch
size 16 is only ~113 optimizer steps and tokenizing all of it takes well under a second.

Rebuild the committed file with ``python -m minipeft builtin-data`` (a test checks it is unchanged).
"""

import json
import random

from minipeft.builtin.facts import (ALPHABET, ANIMALS, ANTONYMS, COLORS, COUNTRIES, LIST_WORDS, PLURALS, animal_legs,
                                    capitalize, number_word, with_article)

NUM_RECORDS = 2000
SEED = 1234


def capital_task(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(COUNTRIES))
    capital, continent = COUNTRIES[country]
    return rng.choice([
        (f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."),
        ("Name the capital of this country.", country, capital),
        (f"{capital} is the capital of which country?", "", f"{capital} is the capital of {country}."),
        ("On which continent is this country?", country, f"{country} is in {continent}."),
    ])


def animal_task(rng: random.Random) -> tuple[str, str, str]:
    animal = rng.choice(sorted(ANIMALS))
    sound, young, _, home = ANIMALS[animal]
    a_animal = with_article(animal)
    choices = [
        (f"How many legs does {a_animal} have?", "", animal_legs(animal)),
        (f"Where does {a_animal} live?", "", f"{capitalize(a_animal)} lives {home}."),
    ]
    if sound:
        choices += [(f"What sound does {a_animal} make?", "", f"{capitalize(a_animal)} says {sound}."),
                    ("Write the sound this animal makes.", animal, sound)]
    if young:
        choices += [(f"What is a baby {animal} called?", "", f"A baby {animal} is called {with_article(young)}."),
                    ("Name the young of this animal.", animal, young)]
    return rng.choice(choices)


def antonym_task(rng: random.Random) -> tuple[str, str, str]:
    word, opposite = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return rng.choice([
        (f"What is the opposite of {word}?", "", f"The opposite of {word} is {opposite}."),
        ("Write the antonym of the word below.", word, opposite),
        (f"Give a word that means the opposite of \"{word}\".", "", opposite),
    ])


def plural_task(rng: random.Random) -> tuple[str, str, str]:
    noun = rng.choice(sorted(PLURALS))
    plural = PLURALS[noun]
    return rng.choice([
        (f"What is the plural of {noun}?", "", f"The plural of {noun} is {plural}."),
        ("Write the plural form of this noun.", noun, plural),
        ("Write the singular of this noun.", plural, noun),
    ])


def color_task(rng: random.Random) -> tuple[str, str, str]:
    thing, color = rng.choice(COLORS)
    return rng.choice([
        (f"What color is {thing}?", "", f"{capitalize(thing)} is {color}."),
        ("Name the color of the following.", thing, color),
    ])


def arithmetic_task(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    high, low = max(a, b), min(a, b)
    return rng.choice([
        (f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."),
        ("Add the two numbers.", f"{a} and {b}", str(a + b)),
        ("Calculate the sum.", f"{a} + {b}", f"{a} + {b} = {a + b}"),
        (f"What is {high} minus {low}?", "", f"{high} minus {low} is {high - low}."),
    ])


def number_task(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 98)
    small = rng.randint(0, 20)
    return rng.choice([
        (f"What number comes after {n}?", "", str(n + 1)),
        (f"What number comes before {n + 1}?", "", str(n)),
        ("Write this number in words.", str(small), number_word(small)),
    ])


def letter_task(rng: random.Random) -> tuple[str, str, str]:
    i = rng.randint(0, len(ALPHABET) - 2)
    return rng.choice([
        (f"Which letter comes after {ALPHABET[i]} in the alphabet?", "",
         f"The letter after {ALPHABET[i]} is {ALPHABET[i + 1]}."),
        ("Which letter comes before this one?", ALPHABET[i + 1], ALPHABET[i]),
    ])


def list_task(rng: random.Random) -> tuple[str, str, str]:
    """A task about a comma-separated list of 3-5 words given as input."""
    category = rng.choice(sorted(LIST_WORDS))
    words = rng.sample(LIST_WORDS[category], rng.randint(3, 5))
    listed = ", ".join(words)
    other = rng.choice([c for c in sorted(LIST_WORDS) if c != category])
    odd = rng.choice(LIST_WORDS[other])
    with_odd = words[:-1] + [odd]
    rng.shuffle(with_odd)
    return rng.choice([
        ("Reverse this list of words.", listed, ", ".join(reversed(words))),
        ("Sort these words in alphabetical order.", listed, ", ".join(sorted(words))),
        ("How many words are in this list?", listed, str(len(words))),
        ("What is the first word in the list?", listed, words[0]),
        ("What is the last word in the list?", listed, words[-1]),
        (f"Which word in the list is not one of the {category}?", ", ".join(with_odd), odd),
    ])


TASK_KINDS = {
    # name -> (generator, weight)
    "capital": (capital_task, 3),
    "animal": (animal_task, 3),
    "antonym": (antonym_task, 3),
    "plural": (plural_task, 3),
    "color": (color_task, 2),
    "arithmetic": (arithmetic_task, 3),
    "number": (number_task, 2),
    "letter": (letter_task, 1),
    "list": (list_task, 4),
}


def generate_instruction_data(num_records: int = NUM_RECORDS, seed: int = SEED) -> list[dict[str, str]]:
    """``num_records`` records with distinct (instruction, input), in generation order (already random)."""
    rng = random.Random(seed)
    kinds = sorted(TASK_KINDS)
    weights = [TASK_KINDS[kind][1] for kind in kinds]
    records, seen = [], set()
    while len(records) < num_records:
        kind = rng.choices(kinds, weights)[0]
        instruction, task_input, output = TASK_KINDS[kind][0](rng)
        if (instruction, task_input) not in seen:  # a duplicate could sit in both train and validation
            seen.add((instruction, task_input))
            records.append({"instruction": instruction, "input": task_input, "output": output})
    return records


def default_data_text() -> str:
    """The exact text of ``default_data.json``: a JSON array, one key per line, newline at the end."""
    return json.dumps(generate_instruction_data(), indent=1, ensure_ascii=False) + "\n"

