"""The small world the built-in model knows about: fixed tables of plain facts.

Both the pretraining corpus (:mod:`minipeft.pretraining.corpus`) and the instruction data set
(:mod:`minipeft.builtin.tasks`) are written from these tables, so every answer in the instruction data is
something the pretrained model has read many times, only never in the question-and-answer *format* that
fine-tuning teaches. Each table is small enough to read; every key is unique, so an answer is fully
determined by its question (a word has one antonym, a noun one plural, a country one capital).
"""

# country -> (capital, continent)
COUNTRIES = {
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"), "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"), "Portugal": ("Lisbon", "Europe"), "Greece": ("Athens", "Europe"),
    "Poland": ("Warsaw", "Europe"), "Austria": ("Vienna", "Europe"), "Hungary": ("Budapest", "Europe"),
    "Ireland": ("Dublin", "Europe"), "Norway": ("Oslo", "Europe"), "Sweden": ("Stockholm", "Europe"),
    "Finland": ("Helsinki", "Europe"), "Denmark": ("Copenhagen", "Europe"), "Belgium": ("Brussels", "Europe"),
    "Switzerland": ("Bern", "Europe"), "Romania": ("Bucharest", "Europe"), "Bulgaria": ("Sofia", "Europe"),
    "Serbia": ("Belgrade", "Europe"), "Croatia": ("Zagreb", "Europe"), "Iceland": ("Reykjavik", "Europe"),
    "Estonia": ("Tallinn", "Europe"), "Latvia": ("Riga", "Europe"), "Lithuania": ("Vilnius", "Europe"),
    "Russia": ("Moscow", "Europe"), "Ukraine": ("Kyiv", "Europe"),
    "Egypt": ("Cairo", "Africa"), "Kenya": ("Nairobi", "Africa"), "Nigeria": ("Abuja", "Africa"),
    "Ghana": ("Accra", "Africa"), "Ethiopia": ("Addis Ababa", "Africa"), "Morocco": ("Rabat", "Africa"),
    "Senegal": ("Dakar", "Africa"), "Uganda": ("Kampala", "Africa"), "Zambia": ("Lusaka", "Africa"),
    "Tunisia": ("Tunis", "Africa"), "Algeria": ("Algiers", "Africa"), "Sudan": ("Khartoum", "Africa"),
    "Angola": ("Luanda", "Africa"), "Zimbabwe": ("Harare", "Africa"), "Namibia": ("Windhoek", "Africa"),
    "Botswana": ("Gaborone", "Africa"),
    "Japan": ("Tokyo", "Asia"), "China": ("Beijing", "Asia"), "India": ("New Delhi", "Asia"),
    "Thailand": ("Bangkok", "Asia"), "Vietnam": ("Hanoi", "Asia"), "Indonesia": ("Jakarta", "Asia"),
    "Nepal": ("Kathmandu", "Asia"), "Mongolia": ("Ulaanbaatar", "Asia"), "Iran": ("Tehran", "Asia"),
    "Iraq": ("Baghdad", "Asia"), "South Korea": ("Seoul", "Asia"), "Turkey": ("Ankara", "Asia"),
    "Pakistan": ("Islamabad", "Asia"), "Bangladesh": ("Dhaka", "Asia"), "Afghanistan": ("Kabul", "Asia"),
    "Saudi Arabia": ("Riyadh", "Asia"), "Syria": ("Damascus", "Asia"), "Jordan": ("Amman", "Asia"),
    "Lebanon": ("Beirut", "Asia"), "Qatar": ("Doha", "Asia"), "Cambodia": ("Phnom Penh", "Asia"),
    "Laos": ("Vientiane", "Asia"), "Malaysia": ("Kuala Lumpur", "Asia"),
    "Canada": ("Ottawa", "North America"), "Mexico": ("Mexico City", "North America"),
    "Cuba": ("Havana", "North America"), "Jamaica": ("Kingston", "North America"),
    "Panama": ("Panama City", "North America"), "Guatemala": ("Guatemala City", "North America"),
    "Brazil": ("Brasilia", "South America"), "Argentina": ("Buenos Aires", "South America"),
    "Chile": ("Santiago", "South America"), "Peru": ("Lima", "South America"),
    "Colombia": ("Bogota", "South America"), "Venezuela": ("Caracas", "South America"),
    "Ecuador": ("Quito", "South America"), "Uruguay": ("Montevideo", "South America"),
    "Paraguay": ("Asuncion", "South America"),
    "Australia": ("Canberra", "Oceania"), "New Zealand": ("Wellington", "Oceania"), "Fiji": ("Suva", "Oceania"),
}

# animal -> (sound or None, name of its young, number of legs, where it lives)
ANIMALS = {
    "cow": ("moo", "calf", 4, "on a farm"), "dog": ("woof", "puppy", 4, "in a house"),
    "cat": ("meow", "kitten", 4, "in a house"), "horse": ("neigh", "foal", 4, "on a farm"),
    "sheep": ("baa", "lamb", 4, "on a farm"), "pig": ("oink", "piglet", 4, "on a farm"),
    "duck": ("quack", "duckling", 2, "on a pond"), "hen": ("cluck", "chick", 2, "on a farm"),
    "owl": ("hoot", "owlet", 2, "in a forest"), "lion": ("roar", "cub", 4, "on the savanna"),
    "frog": ("croak", "tadpole", 4, "in a pond"), "goat": ("bleat", "kid", 4, "on a farm"),
    "mouse": ("squeak", "pup", 4, "in a field"), "donkey": ("bray", "foal", 4, "on a farm"),
    "wolf": ("howl", "pup", 4, "in a forest"), "bear": ("growl", "cub", 4, "in a forest"),
    "elephant": ("trumpet", "calf", 4, "on the savanna"), "crow": ("caw", "chick", 2, "in a tree"),
    "goose": ("honk", "gosling", 2, "on a lake"), "turkey": ("gobble", "poult", 2, "on a farm"),
    "snake": ("hiss", "hatchling", 0, "in the grass"), "bee": ("buzz", "larva", 6, "in a hive"),
    "deer": (None, "fawn", 4, "in a forest"), "kangaroo": (None, "joey", 4, "in Australia"),
    "swan": (None, "cygnet", 2, "on a lake"), "whale": (None, "calf", 0, "in the sea"),
    "spider": (None, None, 8, "in a web"), "ant": (None, None, 6, "in a nest"),
    "rabbit": (None, "kit", 4, "in a burrow"), "fox": (None, "cub", 4, "in a den"),
    "eagle": ("screech", "eaglet", 2, "on a cliff"), "seal": ("bark", "pup", 0, "on the ice"),
    "crab": (None, None, 10, "on the beach"), "octopus": (None, None, 8, "in the sea"),
}

# each word appears once across all pairs, so "the opposite of X" has exactly one answer
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("wet", "dry"),
    ("old", "new"), ("hard", "soft"), ("rich", "poor"), ("strong", "weak"), ("loud", "quiet"),
    ("clean", "dirty"), ("near", "far"), ("thick", "thin"), ("high", "low"), ("long", "short"),
    ("day", "night"), ("black", "white"), ("in", "out"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("give", "take"), ("start", "finish"), ("first", "last"),
    ("before", "after"), ("above", "below"), ("inside", "outside"), ("front", "back"),
    ("sweet", "sour"), ("cheap", "expensive"), ("safe", "dangerous"), ("kind", "cruel"),
    ("smooth", "rough"), ("sharp", "dull"), ("deep", "shallow"), ("wide", "narrow"),
    ("awake", "asleep"), ("alive", "dead"), ("north", "south"), ("east", "west"),
    ("always", "never"), ("more", "less"), ("friend", "enemy"), ("laugh", "cry"), ("love", "hate"),
    ("summer", "winter"), ("on", "off"), ("yes", "no"), ("easy", "difficult"), ("good", "bad"),
    ("right", "wrong"), ("arrive", "leave"), ("remember", "forget"), ("question", "answer"),
    ("king", "queen"), ("polite", "rude"), ("tidy", "messy"), ("brave", "afraid"), ("wild", "tame"),
    ("together", "apart"),
]

# noun -> plural, regular and irregular
PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "house": "houses", "apple": "apples",
    "car": "cars", "bird": "birds", "cup": "cups", "girl": "girls", "boy": "boys", "key": "keys",
    "toy": "toys", "day": "days", "box": "boxes", "bus": "buses", "fox": "foxes", "dish": "dishes",
    "church": "churches", "watch": "watches", "glass": "glasses", "brush": "brushes", "wish": "wishes",
    "baby": "babies", "city": "cities", "party": "parties", "story": "stories", "lady": "ladies",
    "cherry": "cherries", "pony": "ponies", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "loaf": "loaves", "life": "lives", "wife": "wives", "shelf": "shelves", "half": "halves",
    "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "piano": "pianos", "photo": "photos",
    "man": "men", "woman": "women", "child": "children", "mouse": "mice", "goose": "geese",
    "foot": "feet", "tooth": "teeth", "person": "people", "ox": "oxen", "sheep": "sheep",
    "deer": "deer", "fish": "fish", "cactus": "cacti", "crisis": "crises", "bench": "benches",
    "horse": "horses", "ship": "ships", "chair": "chairs", "door": "doors", "river": "rivers",
    "star": "stars", "hat": "hats", "shoe": "shoes", "egg": "eggs", "bell": "bells", "lamp": "lamps",
}

# (thing, color); the thing keeps its article so that sentences read naturally
COLORS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a strawberry", "red"), ("an orange", "orange"), ("a lemon", "yellow"), ("a carrot", "orange"),
    ("a cherry", "red"), ("milk", "white"), ("chocolate", "brown"), ("the sea", "blue"),
    ("the sun", "yellow"), ("a pumpkin", "orange"), ("a lime", "green"), ("a plum", "purple"),
    ("a grape", "purple"), ("a cloud", "white"), ("a frog", "green"), ("blood", "red"),
    ("a crow", "black"), ("a tomato", "red"), ("a pea", "green"), ("an eggplant", "purple"),
    ("a polar bear", "white"), ("soil", "brown"), ("a flamingo", "pink"), ("a fire truck", "red"),
    ("a school bus", "yellow"), ("a pine tree", "green"), ("a blueberry", "blue"), ("ash", "grey"),
    ("an elephant", "grey"), ("a coconut", "brown"), ("a rose", "red"), ("a violet", "purple"),
]

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]

# word lists used for list tasks (reverse, sort, count, first/last, odd one out) and stories
LIST_WORDS = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
               "melon", "kiwi", "lime", "fig"],
    "animals": ["cat", "dog", "cow", "horse", "sheep", "pig", "duck", "owl", "lion", "frog", "goat", "wolf",
                "bear", "fox", "rabbit", "deer"],
    "colors": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white",
                "grey"],
    "objects": ["book", "chair", "table", "lamp", "cup", "spoon", "clock", "door", "key", "hat", "shoe",
                "box", "bell", "ball", "pen", "bag"],
    "places": ["forest", "river", "garden", "village", "market", "school", "beach", "hill", "farm",
               "castle", "bridge", "lake"],
}

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo",
         "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe"]

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


# -- the facts as words (shared by the pretraining corpus and the instruction tasks) --
def number_word(n: int) -> str:
    """``4 -> "four"`` for 0..20, digits above."""
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def with_article(noun: str) -> str:
    """``"owl" -> "an owl"``, ``"cat" -> "a cat"``."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def capitalize(text: str) -> str:
    """Upper-case the first letter only (``"the sky" -> "The sky"``; ``str.capitalize`` would lower the rest)."""
    return text[:1].upper() + text[1:]


def animal_legs(animal: str) -> str:
    """``"A spider has eight legs."``; ``"A snake has no legs."``"""
    legs = ANIMALS[animal][2]
    return f"{capitalize(with_article(animal))} has {number_word(legs) if legs else 'no'} legs."
