"""Built-in, deterministic instruction-following tasks.

Every task family generates small problems from tiny in-module word lists and
asks for an answer in a precise form ("the number only", "just the label",
...). A pretrained chat model usually knows *what* the answer is but replies
verbosely ("2 + 3 = 5"); instruction tuning teaches it the requested form.
The ``constraints`` cluster layers verifiable constraints (``data/constraints.py``:
lowercase, word limit, JSON keys, bullets, include/avoid a word, end phrase) on
small tasks; its examples carry the constraints and are scored strictly on them.

Determinism: each (seed, split, family) gets its own ``random.Random`` seeded
with a CRC32 of a string, so output is identical across processes.

Train/eval disjointness: every problem (the generated fields of a family) is
assigned to the eval or the train side by a fixed CRC32 hash of the family
name and the fields, independent of seed and of how many examples are asked
for. Eval prompts therefore never appear in train, whatever sizes are
requested, and eval problems are unseen in train even under another phrasing.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from instill.data.constraints import Constraint, check_all, parse_json

__all__ = [
    "CONSTRAINTS",
    "Example",
    "Family",
    "FAMILIES",
    "SPLITS",
    "clusters",
    "generate",
    "normalize",
    "score",
]

SPLITS = ("train", "eval")
EVAL_BUCKETS = 4  # 1 in EVAL_BUCKETS problems is reserved for eval
MAX_MISSES = 20_000  # consecutive rejected draws before giving up

# --- small word lists (our own) ---------------------------------------------
NAMES = (
    "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maria Noah "
    "Olivia Paul Rosa Sam Tina Victor Wendy Yusuf Zoe Omar Lena Marco Nina Ravi "
    "Sofia Tom Alice Hugo Julia Ken Lucy Max Nora Oscar Priya Ruth"
).split()
CITIES = (
    "Paris London Berlin Madrid Rome Vienna Prague Dublin Lisbon Oslo Tokyo "
    "Cairo Lima Sydney Toronto Chicago Boston Denver Seattle Mumbai Delhi Nairobi "
    "Athens Warsaw Helsinki Zurich Munich Milan Seoul Bangkok"
).split()
NOUNS = (
    "apple chair river table window garden pencil bottle candle mirror basket "
    "ladder pillow carpet guitar camera rocket bucket jacket wallet teapot "
    "blanket hammer bridge forest island mountain castle ticket letter"
).split()
ADJECTIVES = (
    "red blue green small large quiet bright dark warm cold old new soft heavy "
    "happy sunny fresh sweet round tall"
).split()
VERBS = "likes found painted moved cleaned bought sold carried opened fixed".split()
DOMAINS = "example.com mail.org post.net inbox.io letters.co".split()
PRODUCTS = "phone movie book hotel pizza jacket laptop album game chair restaurant".split()
GOOD = "great wonderful excellent amazing fantastic lovely superb delightful".split()
BAD = "terrible awful horrible useless disappointing dreadful broken boring".split()
POSITIVE_REVIEWS = (
    "I loved this {product}, it was {adj}!",
    "This {product} is {adj}. I would buy it again.",
    "What a {adj} {product}. Highly recommended!",
    "The {product} was {adj} and made me so happy.",
    "Absolutely {adj} {product}, best purchase this year.",
)
NEGATIVE_REVIEWS = (
    "I hated this {product}, it was {adj}.",
    "This {product} is {adj}. I want my money back.",
    "What a {adj} {product}. Never again!",
    "The {product} was {adj} and ruined my day.",
    "Truly {adj} {product}, worst purchase this year.",
)
# (source unit, target unit, factor): powers of ten only, learnable by a small model
UNITS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("meters", "millimeters", 1000),
    ("dollars", "cents", 100),
)


# --- data classes ------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]
    family: str
    cluster: str
    scorer: str
    constraints: tuple[Constraint, ...] = ()  # what the prompt asks of the reply's form

    @property
    def reference(self) -> str:
        """The expected answer: content of the final assistant turn."""
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation without the final assistant turn."""
        return [dict(m) for m in self.messages[:-1]]


@dataclass(frozen=True)
class Family:
    name: str
    cluster: str
    scorer: str
    phrasings: tuple[str, ...]
    make: Callable[[random.Random], tuple[dict, str]]


# --- generators: rng -> (fields, answer) -------------------------------------
def _addition(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return {"a": a, "b": b}, str(a + b)


def _larger(rng):
    a, b = rng.sample(range(1, 100), 2)
    return {"a": a, "b": b}, str(max(a, b))


def _unit_conversion(rng):
    src, dst, factor = rng.choice(UNITS)
    value = rng.randint(1, 99)
    return {"value": value, "src": src, "dst": dst}, str(value * factor)


def _count_items(rng):
    items = rng.sample(NOUNS, rng.randint(2, 5))
    return {"items": ", ".join(items)}, str(len(items))


def _sort_numbers(rng):
    nums = rng.sample(range(1, 100), rng.randint(3, 4))
    return {"numbers": ", ".join(map(str, nums))}, ", ".join(map(str, sorted(nums)))


def _reverse_list(rng):
    items = rng.sample(NOUNS, 3)
    return {"items": ", ".join(items)}, ", ".join(reversed(items))


def _phrase(rng):
    return " ".join(rng.sample(ADJECTIVES + NOUNS, rng.randint(2, 3)))


def _uppercase(rng):
    phrase = _phrase(rng)
    return {"text": phrase}, phrase.upper()


def _lowercase(rng):
    phrase = _phrase(rng)
    return {"text": phrase.upper()}, phrase


def _extract_email(rng):
    name = rng.choice(NAMES)
    email = f"{name.lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    other = rng.choice(NAMES)
    sentence = rng.choice(
        (
            f"You can reach {name} at {email} if you have questions.",
            f"{other} sent the report to {email} yesterday.",
            f"Please write to {email} before Friday.",
        )
    )
    return {"sentence": sentence}, email


def _extract_year(rng):
    name, city, year = rng.choice(NAMES), rng.choice(CITIES), rng.randint(1950, 2024)
    sentence = rng.choice(
        (
            f"{name} moved to {city} in {year}.",
            f"In {year}, {name} opened a small shop in {city}.",
            f"{name} finished school in {year} and then traveled a lot.",
        )
    )
    return {"sentence": sentence}, str(year)


def _extract_city(rng):
    name, city, noun = rng.choice(NAMES), rng.choice(CITIES), rng.choice(NOUNS)
    sentence = rng.choice(
        (
            f"{name} visited {city} last summer.",
            f"Last week {name} bought a {noun} in {city}.",
            f"{name} lives in {city} with a cat.",
        )
    )
    return {"sentence": sentence}, city


def _sentence(rng):
    words = [rng.choice(NAMES), rng.choice(VERBS), "the", rng.choice(ADJECTIVES), rng.choice(NOUNS)]
    return words, " ".join(words) + "."


def _first_word(rng):
    words, sentence = _sentence(rng)
    return {"sentence": sentence}, words[0]


def _last_word(rng):
    words, sentence = _sentence(rng)
    return {"sentence": sentence}, words[-1]


def _sentiment(rng):
    label = rng.choice(("positive", "negative"))
    templates, adjs = (POSITIVE_REVIEWS, GOOD) if label == "positive" else (NEGATIVE_REVIEWS, BAD)
    review = rng.choice(templates).format(product=rng.choice(PRODUCTS), adj=rng.choice(adjs))
    return {"review": review}, label


def _json_person(rng):
    name, age = rng.choice(NAMES), rng.randint(18, 90)
    return {"name": name, "age": age}, json.dumps({"name": name, "age": age})


def _people(rng, k: int):
    """A small table: k people with distinct ages, each with a city."""
    names = rng.sample(NAMES, k)
    ages = rng.sample(range(18, 80), k)
    cities = [rng.choice(CITIES) for _ in names]
    rows = "\n".join(f"{n} | {a} | {c}" for n, a, c in zip(names, ages, cities, strict=True))
    return names, ages, cities, "name | age | city\n" + rows


def _table_lookup(rng):
    names, ages, _, table = _people(rng, rng.randint(3, 4))
    i = rng.randrange(len(names))
    return {"table": table, "name": names[i]}, str(ages[i])


def _table_oldest(rng):
    names, ages, _, table = _people(rng, rng.randint(3, 4))
    return {"table": table}, names[ages.index(max(ages))]


def _table_city(rng):
    names, _, cities, table = _people(rng, rng.randint(3, 4))
    i = rng.randrange(len(names))
    return {"table": table, "name": names[i]}, cities[i]


# --- constraint tasks: (fields, answer); the answer obeys the family's constraints ----
PHRASES = ("Thank you.", "See you soon.", "Best wishes.", "Any questions?", "That is all.")


def _lowercase_answer(rng):
    fields, city = _extract_city(rng)
    return fields, city.lower()


def _word_limit(rng):
    adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return {"adj": adj, "noun": noun, "n": rng.randint(3, 8)}, f"A {adj} {noun}."


def _json_keys(rng):
    name, city, year = rng.choice(NAMES), rng.choice(CITIES), rng.randint(1950, 2024)
    sentence = f"{name} moved to {city} in {year}."
    values = {"name": name, "city": city, "year": year}
    keys = sorted(rng.sample(sorted(values), 2))
    fields = {"sentence": sentence, "keys": f'"{keys[0]}" and "{keys[1]}"'}
    return fields, json.dumps({k: values[k] for k in keys})


def _bullet_list(rng):
    n = rng.randint(2, 4)
    items = rng.sample(NOUNS, n + rng.randint(1, 2))
    return {"n": n, "items": ", ".join(items)}, "\n".join(f"- {x}" for x in items[:n])


def _include_word(rng):
    noun, word = rng.choice(NOUNS), rng.choice(ADJECTIVES)
    return {"noun": noun, "word": word}, f"The {noun} is {word}."


def _avoid_word(rng):
    words, sentence = _sentence(rng)
    return {"sentence": sentence, "word": words[3]}, " ".join(words[:3] + words[4:]) + "."


def _end_phrase(rng):
    name, noun, phrase = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(PHRASES)
    return {"name": name, "noun": noun, "phrase": phrase}, f"{name}, the {noun} is ready. {phrase}"


def _lowercase_bullets(rng):
    items = rng.sample(NOUNS, rng.randint(2, 4))
    fields = {"n": len(items), "items": ", ".join(x.upper() for x in items)}
    return fields, "\n".join(f"- {x}" for x in items)


def _keys(fields: dict) -> list[str]:
    return [k.strip('"') for k in fields["keys"].split(" and ")]


# family -> the constraints its prompts carry, from the generated fields
CONSTRAINTS: dict[str, Callable[[dict], tuple[Constraint, ...]]] = {
    "lowercase_answer": lambda f: (Constraint.of("lowercase"),),
    "word_limit": lambda f: (Constraint.of("max_words", n=f["n"]),),
    "json_keys": lambda f: (Constraint.of("json_keys", keys=_keys(f)),),
    "bullet_list": lambda f: (Constraint.of("bullets", n=f["n"]),),
    "include_word": lambda f: (Constraint.of("include_word", word=f["word"]),),
    "avoid_word": lambda f: (Constraint.of("avoid_word", word=f["word"]),),
    "end_phrase": lambda f: (Constraint.of("end_with", phrase=f["phrase"]),),
    "lowercase_bullets": lambda f: (Constraint.of("bullets", n=f["n"]), Constraint.of("lowercase")),
}


# --- families ----------------------------------------------------------------
_NUM = "Answer with the number only."
_SPECS = [
    # (name, cluster, scorer, make, phrasings)
    ("addition", "arithmetic", "exact", _addition, (
        "What is {a} + {b}? " + _NUM,
        "Add {a} and {b}. Reply with just the result in digits.",
        "Compute the sum of {a} and {b}. Give only the number, no words.",
        "{a} plus {b} equals what? Respond with the number and nothing else.",
        "Calculate {a} + {b}. Output only the answer as digits.",
        "Find the total of {a} and {b}. Write just the number.",
        "Sum {a} and {b}; the reply must be the number alone.",
        "I have {a} apples and get {b} more. How many apples now? " + _NUM,
    )),
    ("larger", "arithmetic", "exact", _larger, (
        "Which is larger, {a} or {b}? " + _NUM,
        "Pick the bigger number: {a} or {b}. Reply with just that number.",
        "Of {a} and {b}, which is greater? Give only the number.",
        "Return the maximum of {a} and {b}. Output the number and nothing else.",
        "Compare {a} and {b} and write only the larger one.",
        "Here are two numbers: {a}, {b}. Which one is bigger? " + _NUM,
        "Say which number is higher: {a} or {b}. Only the number, please.",
        "max({a}, {b}) = ? Write the number alone.",
    )),
    ("unit_conversion", "arithmetic", "exact", _unit_conversion, (
        "Convert {value} {src} to {dst}. " + _NUM,
        "How many {dst} are in {value} {src}? Reply with just the number.",
        "{value} {src} is how many {dst}? Give only the number, no units.",
        "Express {value} {src} in {dst}. Output the number only, without units.",
        "Change {value} {src} into {dst}. Write just the number.",
        "Unit conversion: {value} {src} = ? {dst}. " + _NUM,
        "If something measures {value} {src}, what is that in {dst}? " + _NUM,
        "Please turn {value} {src} into {dst}; reply with digits only.",
    )),
    ("count_items", "lists", "exact", _count_items, (
        "How many items are in this list: {items}? " + _NUM,
        "Count the words in this list: {items}. Reply with just the count as a digit.",
        "List: {items}. How many entries does it have? Give only the number.",
        "Tell me how many things are listed here: {items}. Output only the digit.",
        "Count the items: {items}. Respond with the number and nothing else.",
        "{items} -- how many items is that? Write just the number.",
        "Number of entries in [{items}]? " + _NUM,
        "I packed {items}. How many things did I pack? Only the digit.",
    )),
    ("sort_numbers", "lists", "exact", _sort_numbers, (
        "Sort these numbers from smallest to largest: {numbers}. "
        "Reply with only the sorted numbers, separated by commas.",
        "Put {numbers} in ascending order. Output just the numbers, comma-separated.",
        "Arrange in increasing order: {numbers}. Give only the comma-separated list.",
        "Order these numbers from low to high: {numbers}. Answer with the list only.",
        "Numbers: {numbers}. Sort them ascending and write only the result, separated by commas.",
        "Sort ascending: {numbers}. Respond with the sorted list and nothing else.",
        "Give {numbers} sorted from lowest to highest, comma-separated, and nothing else.",
        "Ascending order of {numbers}? Output the sorted numbers only, separated by commas.",
    )),
    ("reverse_list", "lists", "exact", _reverse_list, (
        "Reverse the order of this list: {items}. Reply with only the reversed list.",
        "Write these words in reverse order: {items}. Output just the list.",
        "List: {items}. Give the same items backwards, separated by commas, nothing else.",
        "Reverse {items}. Answer with the reversed list only.",
        "Flip the order of: {items}. Respond with only the new comma-separated list.",
        "Take the list {items} and write it from last to first. Only the list, please.",
        "Output {items} in the opposite order, comma-separated, nothing more.",
        "Backwards, please: {items}. Write only the reversed list.",
    )),
    ("uppercase", "casing", "exact", _uppercase, (
        "Convert to uppercase: {text}. Reply with the converted text only.",
        "Write '{text}' in capital letters. Output just the text.",
        "Rewrite this phrase in all caps: {text}. Give only the result.",
        "Make every letter uppercase: {text}. Respond with the text and nothing else.",
        "Uppercase the following words: {text}. Answer with the result only.",
        "Change '{text}' to upper case. Only write the changed text.",
        "Shout this in capitals: {text}. Write only the capitalised words.",
        "Return {text} with every letter capitalised, and nothing else.",
    )),
    ("lowercase", "casing", "exact", _lowercase, (
        "Convert to lowercase: {text}. Reply with the converted text only.",
        "Write '{text}' in small letters. Output just the text.",
        "Rewrite this phrase in all lowercase: {text}. Give only the result.",
        "Make every letter lowercase: {text}. Respond with the text and nothing else.",
        "Lowercase the following words: {text}. Answer with the result only.",
        "Change '{text}' to lower case. Only write the changed text.",
        "Write {text} without any capital letters. Give only the result.",
        "Put this in lower case: {text}. Output nothing but the converted words.",
    )),
    ("extract_email", "extraction", "exact", _extract_email, (
        "Extract the email address from this sentence: {sentence} Reply with the email only.",
        "Sentence: {sentence} What is the email address? Give just the address.",
        "Find the email in the following text and output only it: {sentence}",
        "{sentence} Which email address is mentioned? Answer with the address alone.",
        "Pull out the email address: {sentence} Respond with nothing but the address.",
        "Text: {sentence} Copy the email address, and write nothing else.",
        "What address should I email? {sentence} Only the address.",
        "Given: {sentence} Return just the email address it contains.",
    )),
    ("extract_year", "extraction", "exact", _extract_year, (
        "Extract the year from this sentence: {sentence} Reply with the year only.",
        "Sentence: {sentence} Which year is mentioned? Give just the four digits.",
        "Find the year in the following text and output only it: {sentence}",
        "{sentence} What year is that? Answer with the year alone.",
        "Pull out the year: {sentence} Respond with nothing but the number.",
        "Text: {sentence} Copy the year, and write nothing else.",
        "When did it happen? {sentence} Reply with the year as four digits, nothing else.",
        "Given: {sentence} Return just the year it contains.",
    )),
    ("extract_city", "extraction", "exact", _extract_city, (
        "Extract the city name from this sentence: {sentence} Reply with the city only.",
        "Sentence: {sentence} Which city is mentioned? Give just the name.",
        "Find the city in the following text and output only its name: {sentence}",
        "{sentence} What city is that? Answer with the city name alone.",
        "Pull out the city: {sentence} Respond with nothing but the name.",
        "Text: {sentence} Copy the city name, and write nothing else.",
        "Where? {sentence} Reply with the city name, nothing else.",
        "Given: {sentence} Return just the city it mentions.",
    )),
    ("first_word", "extraction", "exact", _first_word, (
        "What is the first word of this sentence: {sentence} Reply with the word only.",
        "Sentence: {sentence} Give just its first word.",
        "Write only the first word of: {sentence}",
        "{sentence} Which word comes first? Answer with that word alone.",
        "Copy the first word of the following sentence and nothing else: {sentence}",
        "Text: {sentence} Output the opening word only.",
        "Given: {sentence} Return just the word it starts with.",
        "Which word opens this sentence? {sentence} Only that word.",
    )),
    ("last_word", "extraction", "exact", _last_word, (
        "What is the last word of this sentence: {sentence} Reply with the word only.",
        "Sentence: {sentence} Give just its final word, without the period.",
        "Write only the last word of: {sentence}",
        "{sentence} Which word comes last? Answer with that word alone.",
        "Copy the last word of the following sentence and nothing else: {sentence}",
        "Text: {sentence} Output the final word only, without punctuation.",
        "Given: {sentence} Return just the word it ends with, no punctuation.",
        "Which word closes this sentence? {sentence} Only that word, without the period.",
    )),
    ("sentiment", "classification", "exact", _sentiment, (
        "Review: {review} Is this review positive or negative? Reply with just the label.",
        "Classify the sentiment of this review as positive or negative: {review} "
        "Answer with one lowercase word.",
        "{review} Label this text positive or negative. Output only the label.",
        "Sentiment (positive/negative) of: {review} Give only the label, in lowercase.",
        "Read the review and answer positive or negative, nothing else. {review}",
        "Text: {review} Choose a label from: positive, negative. Respond with the label only.",
        "Is the writer happy or unhappy? {review} Answer positive or negative, only the label.",
        "Given: {review} Return the sentiment label, positive or negative, and nothing else.",
    )),
    ("json_person", "formatting", "json", _json_person, (
        "Give name {name} and age {age} as JSON with keys name and age. Output only the JSON.",
        "Write a JSON object with keys name and age for {name}, aged {age}. Only the JSON.",
        "Format as JSON with keys name and age: {name} is {age} years old. Reply with JSON only.",
        "Produce JSON with keys name and age. Name: {name}. Age: {age}. No other text.",
        "Encode {name} (age {age}) as a JSON object with keys name and age, nothing else.",
        "Return only a JSON object with keys name and age for name {name} and age {age}.",
        "Person: {name}, {age} years. Give a JSON object with keys name and age and no other text.",
        "Serialise to JSON (keys name, age): {name}, {age}. Output the JSON alone.",
    )),
    ("table_lookup", "tables", "exact", _table_lookup, (
        "{table}\nHow old is {name}? " + _NUM,
        "Here is a table:\n{table}\nWhat is {name}'s age? Reply with just the number.",
        "Table:\n{table}\nLook up the age of {name}. Give only the number.",
        "{table}\nFrom the table above, give {name}'s age and nothing else.",
        "Using this table, find {name}'s age:\n{table}\nAnswer with digits only.",
        "Read the table and tell me the age of {name}. Only the number.\n{table}",
        "{table}\nQuestion: what age is {name}? Write just the number.",
        "Data:\n{table}\nReturn the age in {name}'s row. Output the number alone.",
    )),
    ("table_oldest", "tables", "exact", _table_oldest, (
        "{table}\nWho is the oldest person in the table? Reply with the name only.",
        "Here is a table:\n{table}\nWhich person is the oldest? Give just the name.",
        "Table:\n{table}\nFind the person with the highest age. Answer with the name alone.",
        "{table}\nFrom the table above, name the oldest person and nothing else.",
        "Using this table, who is oldest?\n{table}\nOnly the name, please.",
        "Read the table and tell me who has the greatest age. Only the name.\n{table}",
        "{table}\nQuestion: who is the oldest? Write just the name.",
        "Data:\n{table}\nReturn the name in the row with the largest age. Output the name alone.",
    )),
    ("table_city", "tables", "exact", _table_city, (
        "{table}\nWhich city does {name} live in? Reply with the city only.",
        "Here is a table:\n{table}\nWhat is {name}'s city? Give just the name of the city.",
        "Table:\n{table}\nLook up the city of {name}. Answer with the city alone.",
        "{table}\nFrom the table above, give {name}'s city and nothing else.",
        "Using this table, find where {name} lives:\n{table}\nOnly the city name.",
        "Read the table and tell me the city of {name}. Only the city.\n{table}",
        "{table}\nQuestion: where does {name} live? Write just the city.",
        "Data:\n{table}\nReturn the city in {name}'s row. Output the city alone.",
    )),
    ("lowercase_answer", "constraints", "constraints", _lowercase_answer, (
        "Which city is mentioned in this sentence? {sentence} Write your answer in lowercase "
        "letters only.",
        "{sentence} Name the city, using no capital letters at all.",
        "Sentence: {sentence} Give the city, all in lowercase.",
        "Find the city in: {sentence} Your answer must be entirely lowercase.",
        "What city does this mention? {sentence} Reply in lower case only.",
        "Text: {sentence} Write the city name in small letters, no capitals.",
        "{sentence} Which city? Answer in all-lowercase letters.",
        "Extract the city from this text and write it without capitals: {sentence}",
    )),
    ("word_limit", "constraints", "constraints", _word_limit, (
        "Describe a {adj} {noun} in {n} words or fewer.",
        "In at most {n} words, describe a {adj} {noun}.",
        "Give a description of a {adj} {noun} that is no longer than {n} words.",
        "Describe a {adj} {noun}. Use {n} words at most.",
        "Write a very short description (max {n} words) of a {adj} {noun}.",
        "Using no more than {n} words, describe a {adj} {noun}.",
        "A {adj} {noun}: describe it in {n} words or less.",
        "Say what a {adj} {noun} is like. Keep it to {n} words or fewer.",
    )),
    ("json_keys", "constraints", "constraints", _json_keys, (
        "{sentence} Answer with a JSON object with exactly the keys {keys}.",
        "From this sentence, give a JSON object with the keys {keys} and no others: {sentence}",
        "Sentence: {sentence} Output JSON whose keys are exactly {keys}.",
        "Turn this into a JSON object with keys {keys} only: {sentence}",
        "Extract {keys} from the text below as a JSON object, nothing else. {sentence}",
        "{sentence} Return only JSON with the keys {keys}.",
        "Write a JSON object with precisely the keys {keys} for this: {sentence}",
        "Text: {sentence} Give the facts as JSON; use the keys {keys} and no other keys.",
    )),
    ("bullet_list", "constraints", "constraints", _bullet_list, (
        "Pick {n} items from this list and write them as a bulleted list with exactly {n} lines "
        "starting with '- ': {items}",
        "From {items}, choose {n}. Format them as {n} bullet points, each line starting with '- '.",
        "List exactly {n} of these as bullets ('- ' at the start of each line): {items}",
        "Give {n} items from {items} as a bulleted list, one per line, starting with '- '.",
        "Write a bulleted list of exactly {n} items taken from: {items}. Start each line "
        "with '- '.",
        "Choose {n} words from {items} and list them as bullets, '- ' before each.",
        "Bulleted list, exactly {n} lines each beginning with '- ', using words from: {items}",
        "Items: {items}. Output {n} of them as a '- ' bulleted list and nothing else.",
    )),
    ("include_word", "constraints", "constraints", _include_word, (
        "Write one short sentence about a {noun}. Include the word '{word}'.",
        "Describe a {noun} in one sentence that uses the word '{word}'.",
        "Say something about a {noun}, and make sure the word '{word}' appears.",
        "One sentence about a {noun}, please; it must contain the word '{word}'.",
        "Use the word '{word}' in a short sentence about a {noun}.",
        "Write a sentence about a {noun} with the word '{word}' in it.",
        "Tell me about a {noun} in one sentence. The word '{word}' has to be included.",
        "Make a short sentence about a {noun} containing '{word}'.",
    )),
    ("avoid_word", "constraints", "constraints", _avoid_word, (
        "Rewrite this sentence without the word '{word}': {sentence}",
        "Remove the word '{word}' from this sentence and write the result: {sentence}",
        "{sentence} Write this sentence again, but do not use the word '{word}'.",
        "Sentence: {sentence} Repeat it without '{word}'.",
        "Drop the word '{word}' and give the rest of the sentence: {sentence}",
        "Write the sentence below with the word '{word}' left out. {sentence}",
        "Without using the word '{word}', restate: {sentence}",
        "Text: {sentence} Give the same sentence minus the word '{word}'.",
    )),
    ("end_phrase", "constraints", "constraints", _end_phrase, (
        "Write a one-sentence note to {name} about the {noun}. End your answer with the exact "
        "phrase '{phrase}'",
        "Tell {name} in one line that the {noun} is ready, and finish with '{phrase}'",
        "Write {name} a short message about the {noun}. The last words must be '{phrase}'",
        "A short note to {name} about the {noun}, please, ending exactly with '{phrase}'",
        "Send {name} one sentence about the {noun}; your reply must end with '{phrase}'",
        "Draft a brief note for {name} about the {noun}. Close with the phrase '{phrase}'",
        "Let {name} know about the {noun} in a sentence, then end with '{phrase}' exactly.",
        "Note for {name} about the {noun}. Make '{phrase}' the very end of your answer.",
    )),
    ("lowercase_bullets", "constraints", "constraints", _lowercase_bullets, (
        "Write these {n} words as a bulleted list in lowercase, each line starting with '- ': "
        "{items}",
        "Make a '- ' bulleted list of these {n} words, all lowercase: {items}",
        "{items}: list these {n} words as bullets ('- ') using no capital letters.",
        "Put the {n} words {items} in a bulleted list, one per line with '- ', in lower case.",
        "Bullet these {n} words, lowercase only, each line starting with '- ': {items}",
        "Rewrite {items} as {n} lowercase bullet points beginning with '- '.",
        "List {items} ({n} words) as '- ' bullets, without any capital letters.",
        "Turn {items} into a bulleted list of {n} lines starting with '- ', all in lowercase.",
    )),
]  # fmt: skip

FAMILIES: dict[str, Family] = {
    name: Family(name, cluster, scorer, phrasings, make)
    for name, cluster, scorer, make, phrasings in _SPECS
}


def clusters() -> dict[str, list[str]]:
    """Each cluster and its families, in definition order."""
    out: dict[str, list[str]] = {}
    for fam in FAMILIES.values():
        out.setdefault(fam.cluster, []).append(fam.name)
    return out


# --- generation --------------------------------------------------------------
def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _split_of(family: str, fields: dict) -> str:
    """Fixed (seed-independent) assignment of a problem to train or eval."""
    key = family + "|" + json.dumps(fields, sort_keys=True)
    return "eval" if _crc(key) % EVAL_BUCKETS == 0 else "train"


def generate(
    split: str, per_family: int, seed: int = 0, families: list[str] | None = None
) -> list[Example]:
    """Generate ``per_family`` unique examples for each family (grouped by family).

    Same arguments give identical output in any process. Eval problems never
    occur in train (see module docstring); prompts are unique within a split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; valid families: {', '.join(FAMILIES)}")
    if per_family < 0:
        raise ValueError("per_family must be >= 0")
    out: list[Example] = []
    for name in names:
        fam = FAMILIES[name]
        rng = random.Random(_crc(f"instill-builtin|{seed}|{split}|{name}"))
        seen: set[str] = set()
        misses = 0  # draws since the last new example
        while len(seen) < per_family:
            fields, answer = fam.make(rng)
            prompt = rng.choice(fam.phrasings).format(**fields)
            if _split_of(name, fields) != split or prompt in seen:
                misses += 1
                if misses > MAX_MISSES:
                    raise ValueError(
                        f"could not generate {per_family} unique {split} examples for "
                        f"{name!r} (got {len(seen)}); ask for fewer"
                    )
                continue
            misses = 0
            seen.add(prompt)
            messages = (
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            )
            checks = CONSTRAINTS[name](fields) if name in CONSTRAINTS else ()
            out.append(Example(messages, name, fam.cluster, fam.scorer, checks))
    return out


# --- scoring -----------------------------------------------------------------
_QUOTES = " \t\r\n\"'`"


def normalize(text: str) -> str:
    """Normalize an answer for exact-match comparison.

    Strips surrounding whitespace and surrounding quotes/backticks (``"``,
    ``'``, `````), collapses every internal whitespace run to one space and
    drops one trailing period (then strips quotes/whitespace again, so
    ``'"5".'`` becomes ``5``). Case is preserved: comparison is case-sensitive.
    """
    s = text.strip(_QUOTES)
    if s.endswith("."):
        s = s[:-1].strip(_QUOTES)
    return re.sub(r"\s+", " ", s)


def score(example_or_scorer: Example | Family | str, prediction: str, reference: str) -> float:
    """Score a prediction against a reference: 1.0 if correct, else 0.0.

    The first argument is an Example/Family (its ``scorer`` is used) or a scorer
    name. "exact": equality after :func:`normalize`. "json": both sides parsed
    with ``json.loads`` (prediction stripped, optionally inside a ```json
    fence) and compared as objects (types must match); invalid JSON scores 0.
    "constraints" (needs the Example): 1 only when the prediction obeys every
    constraint of the prompt (strict, see ``data/constraints.py``); the
    reference is one reply that does.
    """
    kind = getattr(example_or_scorer, "scorer", example_or_scorer)
    if kind == "exact":
        return float(normalize(prediction) == normalize(reference))
    if kind == "json":
        try:
            pred, ref = parse_json(prediction), parse_json(reference)
        except (ValueError, TypeError):
            return 0.0
        return float(json.dumps(pred, sort_keys=True) == json.dumps(ref, sort_keys=True))
    if kind == "constraints":
        checks = getattr(example_or_scorer, "constraints", ())
        if not checks:
            raise ValueError("the constraints scorer needs the Example (it holds the constraints)")
        return float(all(check_all(checks, prediction).values()))
    raise ValueError(f"unknown scorer {kind!r}; valid scorers: exact, json, constraints")
