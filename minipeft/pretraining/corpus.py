"""The pretraining corpus of the built-in model: short plain-English documents written from :mod:`facts`.

Each document is one paragraph of one kind (a country, an animal, opposites, plurals, colors, sums, the
alphabet, a list of words, a little story, a table of terse ``key: value`` rows under a Markdown heading,
a few sentences about writing answers to tasks). Sentences are drawn from a few phrasings and shuffled, so
the model has to learn the facts rather than one fixed string; headings, line breaks and the everyday words
of written tasks ("instruction", "input", "response") are there because any real pretraining corpus has
them. Questions and answers appear only as reported
speech (``Anna asked, "What is the capital of Peru?" Ben said, "The capital of Peru is Lima."``), never in
the ``### Instruction:`` / ``### Response:`` layout that instruction tuning teaches.

Everything comes from one seeded :class:`random.Random`, so ``generate_corpus(n, seed)`` returns the same
documents on every machine and Python version.
"""

import random

from minipeft.builtin.facts import (
    ALPHABET, ANIMALS, ANTONYMS, COLORS, COUNTRIES, LIST_WORDS, NAMES, NUMBER_WORDS, PLURALS, animal_legs, capitalize,
    number_word, with_article,
)


def dialogue(rng: random.Random, question: str, answer: str) -> str:
    """A question and its answer as reported speech between two people."""
    asker, answerer = rng.sample(NAMES, 2)
    return f'{asker} asked, "{question}" {answerer} said, "{answer}"'


def heading(rng: random.Random, title: str) -> str:
    """A Markdown heading line for about a third of the documents that can have one, else nothing."""
    return rng.choice([f"### {title}\n", f"## {title}\n\n", "", "", "", ""])


def country_document(rng: random.Random) -> str:
    country = rng.choice(sorted(COUNTRIES))
    capital, continent = COUNTRIES[country]
    neighbours = [c for c in sorted(COUNTRIES) if COUNTRIES[c][1] == continent and c != country]
    sentences = [
        f"{country} is a country in {continent}.",
        f"The capital of {country} is {capital}.",
        rng.choice([f"{capital} is the capital city of {country}.", f"{capital} is a big city in {country}."]),
        "Other countries in {} are {} and {}.".format(continent, *rng.sample(neighbours, 2)),
        dialogue(rng, f"What is the capital of {country}?", f"The capital of {country} is {capital}."),
        f"{rng.choice(NAMES)} flew to {capital}, the capital of {country}.",
    ]
    rng.shuffle(sentences)
    return heading(rng, country) + " ".join(sentences[: rng.randint(3, len(sentences))])


def animal_document(rng: random.Random) -> str:
    animal = rng.choice(sorted(ANIMALS))
    sound, young, _, home = ANIMALS[animal]
    a_animal = with_article(animal)
    sentences = [f"{capitalize(a_animal)} lives {home}.", animal_legs(animal)]
    if sound:
        sentences.append(f"{capitalize(a_animal)} says {sound}.")
        sentences.append(dialogue(rng, f"What sound does {a_animal} make?", f"{capitalize(a_animal)} says {sound}."))
    if young:
        sentences.append(f"A baby {animal} is called {with_article(young)}.")
        sentences.append(f"The young of {a_animal} is {with_article(young)}.")
    rng.shuffle(sentences)
    return heading(rng, f"The {animal}") + " ".join(sentences)


def antonym_document(rng: random.Random) -> str:
    sentences = []
    for word, opposite in rng.sample(ANTONYMS, 3):
        if rng.random() < 0.5:
            word, opposite = opposite, word
        sentences.append(rng.choice([
            f"The opposite of {word} is {opposite}.",
            f"{capitalize(word)} and {opposite} are opposites.",
            f"{capitalize(opposite)} is the opposite of {word}.",
            dialogue(rng, f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."),
        ]))
    return " ".join(sentences)


def plural_document(rng: random.Random) -> str:
    sentences = []
    for noun in rng.sample(sorted(PLURALS), 3):
        plural = PLURALS[noun]
        count = rng.randint(2, 9)
        sentences.append(rng.choice([
            f"The plural of {noun} is {plural}.",
            f"One {noun}, {number_word(count)} {plural}.",
            f"I have one {noun} and you have {number_word(count)} {plural}.",
            dialogue(rng, f"What is the plural of {noun}?", f"The plural of {noun} is {plural}."),
        ]))
    return " ".join(sentences)


def color_document(rng: random.Random) -> str:
    sentences = []
    for thing, color in rng.sample(COLORS, 3):
        sentences.append(rng.choice([
            f"{capitalize(thing)} is {color}.",
            f"The color of {thing} is {color}.",
            dialogue(rng, f"What color is {thing}?", f"{capitalize(thing)} is {color}."),
        ]))
    return " ".join(sentences)


def number_document(rng: random.Random) -> str:
    sentences = []
    for _ in range(4):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        high, low = max(a, b), min(a, b)
        n = rng.randint(0, 98)
        sentences.append(rng.choice([
            f"{a} plus {b} is {a + b}.",
            f"{a} + {b} = {a + b}.",
            f"{high} minus {low} is {high - low}.",
            f"{capitalize(number_word(a))} plus {number_word(b)} makes {number_word(a + b)}.",
            f"The number {a} is written {number_word(a)}.",
            f"After {n} comes {n + 1}.",
            f"The number before {n + 1} is {n}.",
            f"Counting up: {', '.join(str(k) for k in range(n, n + rng.randint(3, 6)))}.",
            dialogue(rng, f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
        ]))
    return " ".join(sentences)


def alphabet_document(rng: random.Random) -> str:
    start = rng.randint(0, len(ALPHABET) - 6)
    i = rng.randint(0, len(ALPHABET) - 2)
    sentences = [
        f"The letters go {', '.join(ALPHABET[start:start + rng.randint(3, 6)])}.",
        f"The letter after {ALPHABET[i]} is {ALPHABET[i + 1]}.",
        f"The letter before {ALPHABET[i + 1]} is {ALPHABET[i]}.",
        f"The alphabet has {len(ALPHABET)} letters, from a to z.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[:3])


def list_document(rng: random.Random) -> str:
    """A list of words and what can be said about it: count, ends, order, reversal, an odd one out."""
    category = rng.choice(sorted(LIST_WORDS))
    words = rng.sample(LIST_WORDS[category], rng.randint(3, 5))
    name = rng.choice(NAMES)
    sentences = [
        f"{name} wrote a list of {category}: {', '.join(words)}.",
        f"There are {number_word(len(words))} {category} in the list.",
        f"The first one is {words[0]} and the last one is {words[-1]}.",
        f"In alphabetical order these words are: {', '.join(sorted(words))}.",
        f"Backwards, the list reads: {', '.join(reversed(words))}.",
    ]
    other = rng.choice([c for c in sorted(LIST_WORDS) if c != category])
    odd = rng.choice(LIST_WORDS[other])
    sentences.append(f"{capitalize(odd)} is not one of the {category}; it is one of the {other}.")
    if rng.random() < 0.5:
        return " ".join([sentences[0]] + rng.sample(sentences[1:], rng.randint(2, 5)))
    lines = [f"Words: {', '.join(words)}", f"Sorted: {', '.join(sorted(words))}",
             f"Reversed: {', '.join(reversed(words))}", f"Count: {len(words)}", f"First: {words[0]}",
             f"Last: {words[-1]}"]
    return f"### A list of {category}\n" + "\n".join([lines[0]] + rng.sample(lines[1:], rng.randint(2, 5)))


def story_document(rng: random.Random) -> str:
    """A five-sentence story in two paragraphs that strings facts together."""
    name, friend = rng.sample(NAMES, 2)
    animal, friend_animal = rng.sample(sorted(ANIMALS), 2)
    country = rng.choice(sorted(COUNTRIES))
    place = rng.choice(LIST_WORDS["places"])
    thing = rng.choice(LIST_WORDS["objects"])
    color = rng.choice(LIST_WORDS["colors"])
    word, opposite = rng.choice(ANTONYMS)
    sound = ANIMALS[friend_animal][0]
    return " ".join([
        f"Once upon a time, a little {animal} named {name} lived in {country}.",
        f"Every morning, {name} walked to the {place}.\n\n"
        f"One day, {name} found {with_article(color)} {thing} near the {place}.",
        f'"Look!" said {name} to {friend}, {with_article(friend_animal)}.'
        + (f' {friend} said "{sound}".' if sound else ""),
        f"That evening {name} learned that the opposite of {word} is {opposite}, and the friends went home.",
    ])


def _sum_row(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"{a} + {b} = {a + b}"


def _antonym_row(rng: random.Random) -> str:
    pair = rng.choice(ANTONYMS)
    return "{}: {}".format(*(pair if rng.random() < 0.5 else reversed(pair)))


# title -> one row of a table; the rows state the same facts as the prose, tersely
TABLES = {
    "Capital cities": lambda rng: "{0}: {1[0]}".format(*rng.choice(sorted(COUNTRIES.items()))),
    "Countries and continents": lambda rng: "{0}: {1[1]}".format(*rng.choice(sorted(COUNTRIES.items()))),
    "Opposites": _antonym_row,
    "Plurals": lambda rng: "{}: {}".format(*rng.choice(sorted(PLURALS.items()))),
    "Baby animals": lambda rng: rng.choice([f"{a}: {v[1]}" for a, v in sorted(ANIMALS.items()) if v[1]]),
    "Animal sounds": lambda rng: rng.choice([f"{a}: {v[0]}" for a, v in sorted(ANIMALS.items()) if v[0]]),
    "Legs": lambda rng: rng.choice([f"{a}: {v[2]}" for a, v in sorted(ANIMALS.items())]),
    "Colors": lambda rng: "{}: {}".format(*rng.choice(COLORS)),
    "Numbers in words": lambda rng: "{0}: {1}".format(*rng.choice(list(enumerate(NUMBER_WORDS)))),
    "Sums": _sum_row,
}


def table_document(rng: random.Random) -> str:
    """A heading and 3-8 terse rows of one kind of fact, one per line."""
    title = rng.choice(sorted(TABLES))
    num_rows, rows = rng.randint(3, 8), []
    while len(rows) < num_rows:
        row = TABLES[title](rng)
        if row not in rows:
            rows.append(row)
    return rng.choice([f"### {title}\n", f"{title}:\n", f"## {title}\n\n"]) + "\n".join(rows)


# Plain sentences that use the everyday words of written tasks (instruction, task, input, response...).
WRITING_SENTENCES = [
    "{name} read the instruction twice before starting the task.",
    "An instruction describes a task, and a good answer does what it asks.",
    "The teacher gave {name} a request and an input to work with.",
    "The input provides further context, such as a word or a list.",
    "{name} wrote a short response that completes the task.",
    "Each task was paired with an example below it.",
    "A response should be short and answer the request appropriately.",
    "Below is a note from {name} about the homework.",
    "{name} checked that the response was right and then wrote the next one.",
    "Some tasks need no input at all; the instruction is enough.",
    "Write your answer on one line, {name} said.",
    "The request was easy, so {name} completed it quickly.",
]


def writing_document(rng: random.Random) -> str:
    sentences = rng.sample(WRITING_SENTENCES, rng.randint(3, 5))
    return " ".join(sentence.format(name=rng.choice(NAMES)) for sentence in sentences)


DOCUMENT_KINDS = {
    # name -> (generator, weight); facts the instruction data asks about get most of the text
    "country": (country_document, 4),
    "animal": (animal_document, 3),
    "antonym": (antonym_document, 2),
    "plural": (plural_document, 2),
    "color": (color_document, 2),
    "number": (number_document, 3),
    "alphabet": (alphabet_document, 1),
    "list": (list_document, 4),
    "story": (story_document, 2),
    "table": (table_document, 4),
    "writing": (writing_document, 1),
}


def generate_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """``num_documents`` paragraphs, each of a kind drawn with the weights in :data:`DOCUMENT_KINDS`."""
    rng = random.Random(seed)
    kinds = sorted(DOCUMENT_KINDS)
    weights = [DOCUMENT_KINDS[kind][1] for kind in kinds]
    return [DOCUMENT_KINDS[kind][0](rng) for kind in rng.choices(kinds, weights, k=num_documents)]
