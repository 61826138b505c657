"""The embedded benchmark's world: entity types, their attributes, and the sentences about them.

Every attribute has passage sentences, a short answer, an explicit question naming the entity,
pronoun questions and an ellipsis noun. Slots: {N} the entity's in-sentence name, {it}/{its}/{obj}
/{It} its pronouns (or, when resolved for the oracle rewrite, its name), and the attribute's value
slots. The question words of an attribute occur in its passage and in no other passage of the
same type, so with the entity's name resolved BM25 finds the gold at rank 1, and without it the
question matches the same attribute of every entity of that type (and of other types sharing a
word: "built", "long").
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

Values = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Attr:
  key: str
  values: Callable[["Pools", random.Random], Values]
  passage: str
  answer: str
  explicit: str
  pronoun: tuple[str, ...]
  noun: str


@dataclasses.dataclass(frozen=True)
class EType:
  key: str
  noun: str          # type noun, as in "Back to the castle: ..."
  ref: str           # in-sentence reference from the generated name {X}
  title: str         # passage title
  endings: tuple[str, ...]
  fillers: tuple[str, ...]
  attrs: tuple[Attr, ...]
  person: bool = False  # pronoun he/she instead of it


@dataclasses.dataclass
class Pools:
  """Value pools drawn once per benchmark (towns, people, families, ...), all invented names."""
  towns: list[str]
  people: list[str]
  families: list[str]
  mountains: list[str]
  seas: list[str]


def _year(rng, lo, hi) -> str:
  return str(rng.randint(lo, hi))


LEGENDS = ("a white horse walks the walls at night", "a bell rings in the empty chapel at dawn",
           "a lost crown lies under the well", "a sleeping giant built the first wall",
           "a lady in grey guards the gate", "the moat never freezes in winter")
FISH = ("trout and pike", "eels and perch", "salmon and carp", "pike and bream", "perch and trout",
        "carp and eels")
INSTRUMENTS = ("violin", "cello", "organ", "harp", "flute", "piano", "oboe", "clarinet")
WORK_ADJ = ("Winter", "Lantern", "Harbour", "Silver", "Northern", "Amber", "Meadow", "Storm",
            "Glass", "Orchard")
WORK_FORM = ("Symphony", "Sonata", "Requiem", "Concerto", "Suite", "Mass")
PRODUCTS = ("glass lenses", "steel cables", "paper lanterns", "bicycle parts", "garden tools",
            "wool blankets", "clock springs", "ceramic tiles", "copper wire", "rope and sails")
FATES = ("sank in a storm", "was broken up for scrap", "became a museum ship",
         "ran aground on a reef", "was sold to a foreign navy", "burned in the harbour")

CASTLE = EType(
    key="castle", noun="castle", ref="{X} Castle", title="{X} Castle",
    endings=("holt", "burg", "mark", "stein", "gard", "wick", "mont", "fort", "crag", "keep"),
    fillers=("The castle is one of many castles in the region.",
             "Visitors to the castle can join a guided tour.",
             "The castle appears in several travel guides."),
    attrs=(
        Attr("location", lambda p, r: {"town": r.choice(p.towns)},
             "{N} is located on a rocky ridge above the town of {town}, with a wide view over the "
             "valley.", "{N} is located above the town of {town}.", "Where is {N} located?",
             ("Where is {it} located?", "Near which town is {it} located?"), "location"),
        Attr("built", lambda p, r: {"year": _year(r, 1100, 1650)},
             "{N} was built in {year}; construction of the walls took almost twenty years.",
             "{N} was built in {year}.", "When was {N} built?", ("When was {it} built?",),
             "construction"),
        Attr("architect", lambda p, r: {"person": r.choice(p.people)},
             "{N} was designed by the architect {person}, who also drew the plans for the "
             "gatehouse.",
             "{N} was designed by {person}.", "Who was the architect of {N}?",
             ("Who designed {it}?", "Who was {its} architect?"), "architect"),
        Attr("owners", lambda p, r: {"family": r.choice(p.families)},
             "The {family} family owns {N} today; the owners live in the east wing.",
             "The {family} family owns {N}.", "Who are the owners of {N}?",
             ("Who owns {it} today?", "Who are {its} owners?"), "owners"),
        Attr("tower", lambda p, r: {"height": str(r.randint(18, 75))},
             "The main tower of {N} is {height} metres tall and has a narrow stair inside the "
             "wall.",
             "The main tower of {N} is {height} metres tall.", "How tall is the main tower of {N}?",
             ("How tall is {its} main tower?",), "main tower"),
        Attr("legend", lambda p, r: {"legend": r.choice(LEGENDS)},
             "A legend about {N} says that {legend}, and the story is still told in nearby "
             "villages.",
             "A legend about {N} says that {legend}.", "What legend is told about {N}?",
             ("What legend is told about {it}?", "Is there a legend about {it}?"), "legend"),
    ))

RIVER = EType(
    key="river", noun="river", ref="the {X} River", title="{X} River",
    endings=("enna", "ava", "ine", "ura", "essa", "ona", "isse", "ara", "eva", "una"),
    fillers=("The river is important for farming in the region.",
             "Boats still travel on the river in summer.",
             "Many rivers of the region are known for clear water."),
    attrs=(
        Attr("source", lambda p, r: {"mountains": r.choice(p.mountains)},
             "{N} rises in the {mountains} Mountains, where its source is a small lake fed by "
             "snow.",
             "{N} rises in the {mountains} Mountains.", "Where does {N} rise?",
             ("Where does {it} rise?", "Where is {its} source?"), "source"),
        Attr("length", lambda p, r: {"km": str(r.randint(40, 900))},
             "{N} is {km} kilometres long; its length makes it a major waterway.",
             "{N} is {km} kilometres long.", "How long is {N}?", ("How long is {it}?",), "length"),
        Attr("mouth", lambda p, r: {"sea": r.choice(p.seas), "town": r.choice(p.towns)},
             "{N} flows into the {sea} Sea near the port of {town}; its mouth is a wide delta.",
             "{N} flows into the {sea} Sea.", "Where does {N} flow into the sea?",
             ("Where does {it} flow into the sea?", "Where is {its} mouth?"), "mouth"),
        Attr("towns", lambda p, r: dict(zip(("t1", "t2"), r.sample(p.towns, 2))),
             "The towns of {t1} and {t2} lie on the banks of {N}, where they grew around old "
             "fords.",
             "{t1} and {t2} lie on {N}.", "Which towns lie on {N}?",
             ("Which towns lie on {it}?",), "towns on its banks"),
        Attr("fish", lambda p, r: {"fish": r.choice(FISH)},
             "{N} is home to {fish}; anglers come to fish in its clear water.",
             "{N} is home to {fish}.", "What fish live in {N}?", ("What fish live in {it}?",),
             "fish"),
        Attr("bridges", lambda p, r: {"n": str(r.randint(2, 40))},
             "{n} bridges cross {N}; the oldest bridge is made of stone.",
             "{n} bridges cross {N}.", "How many bridges cross {N}?",
             ("How many bridges cross {it}?",), "bridges"),
    ))

COMPOSER = EType(
    key="composer", noun="composer", ref="{P} {X}", title="{P} {X}", person=True,
    endings=("berg", "mann", "ova", "ini", "ard", "ell", "sen", "ski", "oux", "ley"),
    fillers=("The composer is still admired by musicians.",
             "Many composers of the time knew this music well.",
             "The music of this composer is often played on the radio."),
    attrs=(
        Attr("born", lambda p, r: {"year": _year(r, 1650, 1900), "town": r.choice(p.towns)},
             "{N} was born in {year} in the town of {town}; the house of {its} birth is a museum.",
             "{N} was born in {year} in {town}.", "When was {N} born?",
             ("When was {it} born?", "Where was {it} born?"), "birth"),
        Attr("teacher", lambda p, r: {"person": r.choice(p.people)},
             "{N} was taught music by {person}, a teacher who shaped {its} early style.",
             "{N} was taught by {person}.", "Who was the teacher of {N}?",
             ("Who taught {obj}?", "Who was {its} teacher?"), "teacher"),
        Attr("work", lambda p, r: {"work": f"{r.choice(WORK_ADJ)} {r.choice(WORK_FORM)}"},
             "The most famous work of {N} is the {work}, which was first performed at a festival.",
             "The most famous work of {N} is the {work}.", "What is the most famous work of {N}?",
             ("What is {its} most famous work?",), "most famous work"),
        Attr("instrument", lambda p, r: {"instrument": r.choice(INSTRUMENTS)},
             "{N} played the {instrument} and wrote many pieces for that instrument.",
             "{N} played the {instrument}.", "Which instrument did {N} play?",
             ("Which instrument did {it} play?",), "instrument"),
        Attr("died", lambda p, r: {"year": _year(r, 1700, 1990), "town": r.choice(p.towns)},
             "{N} died in {year} in {town}; {it} had gone there to die near the sea, and {its} "
             "death was mourned widely.", "{N} died in {year} in {town}.", "When did {N} die?",
             ("When did {it} die?", "Where did {it} die?"), "death"),
        Attr("operas", lambda p, r: {"n": str(r.randint(1, 30))},
             "{N} wrote {n} operas, most of them comic operas for small theatres.",
             "{N} wrote {n} operas.", "How many operas did {N} write?",
             ("How many operas did {it} write?",), "number of operas"),
    ))

COMPANY = EType(
    key="company", noun="company", ref="{X} Industries", title="{X} Industries",
    endings=("ex", "ix", "on", "ax", "ium", "ora", "ent", "is", "or", "ic"),
    fillers=("The company is one of the larger employers in the region.",
             "The company is listed on the local stock exchange.",
             "Many companies in the region trade with this company."),
    attrs=(
        Attr("founder", lambda p, r: {"person": r.choice(p.people)},
             "The founder of {N} was {person}, who started the firm in a small workshop.",
             "The founder of {N} was {person}.", "Who was the founder of {N}?",
             ("Who was {its} founder?", "Who was the founder of {it}?"), "founder"),
        Attr("founded", lambda p, r: {"year": _year(r, 1820, 2010)},
             "{N} was founded in {year}; the founding year is printed on all its boxes.",
             "{N} was founded in {year}.", "When was {N} founded?", ("When was {it} founded?",),
             "founding year"),
        Attr("headquarters", lambda p, r: {"town": r.choice(p.towns)},
             "The headquarters of {N} are in {town}, in a brick building near the station.",
             "The headquarters of {N} are in {town}.", "Where are the headquarters of {N}?",
             ("Where are {its} headquarters?",), "headquarters"),
        Attr("products", lambda p, r: {"product": r.choice(PRODUCTS)},
             "{N} makes {product}; these products are sold in shops across the country.",
             "{N} makes {product}.", "What products does {N} make?",
             ("What does {it} make?", "What products does {it} make?"), "products"),
        Attr("employees", lambda p, r: {"n": str(r.randint(30, 9000))},
             "{N} has about {n} employees, and most employees work at its main factory.",
             "{N} has about {n} employees.", "How many employees does {N} have?",
             ("How many employees does {it} have?",), "number of employees"),
        Attr("chief", lambda p, r: {"person": r.choice(p.people)},
             "The chief executive of {N} is {person}, who was appointed by the board.",
             "The chief executive of {N} is {person}.", "Who is the chief executive of {N}?",
             ("Who is {its} chief executive?",), "chief executive"),
    ))

SHIP = EType(
    key="ship", noun="ship", ref="the {X}", title="{X} (ship)",
    endings=("ia", "ora", "ina", "ette", "ande", "ine", "elle", "issa", "anda", "ena"),
    fillers=("The ship is remembered by sailors in many ports.",
             "Models of the ship are shown in maritime museums.",
             "It was one of the larger ships of her time."),
    attrs=(
        Attr("launched", lambda p, r: {"year": _year(r, 1780, 1960)},
             "{N} was launched in {year}, and a crowd watched the launch from the quay.",
             "{N} was launched in {year}.", "When was {N} launched?", ("When was {it} launched?",),
             "launch"),
        Attr("shipyard", lambda p, r: {"town": r.choice(p.towns)},
             "{N} was built at the {town} shipyard by a team of three hundred workers.",
             "{N} was built at the {town} shipyard.", "Which shipyard built {N}?",
             ("Which shipyard built {it}?", "Where was {it} built?"), "shipyard"),
        Attr("captain", lambda p, r: {"person": r.choice(p.people)},
             "The first captain of {N} was {person}, who commanded her for ten years.",
             "The first captain of {N} was {person}.", "Who was the captain of {N}?",
             ("Who was {its} captain?",), "captain"),
        Attr("length", lambda p, r: {"m": str(r.randint(30, 280))},
             "{N} is {m} metres long; her length made her hard to turn in narrow harbours.",
             "{N} is {m} metres long.", "How long is {N}?", ("How long is {it}?",), "length"),
        Attr("fate", lambda p, r: {"year": _year(r, 1850, 2000), "fate": r.choice(FATES)},
             "The fate of {N} was decided in {year}, when she {fate}.",
             "In {year} {N} {fate}.", "What was the fate of {N}?", ("What was {its} fate?",),
             "fate"),
        Attr("port", lambda p, r: {"town": r.choice(p.towns)},
             "The home port of {N} was {town}, where she returned after every voyage.",
             "The home port of {N} was {town}.", "What was the home port of {N}?",
             ("What was {its} home port?",), "home port"),
    ))

TYPES = (CASTLE, RIVER, COMPOSER, COMPANY, SHIP)

FIRST_NAMES_F = ("Ilsa", "Maren", "Tove", "Liora", "Annika", "Sabeth", "Orla", "Vela", "Runa",
                 "Edda", "Mirela", "Katrin")
FIRST_NAMES_M = ("Bertan", "Corvin", "Aldric", "Tobin", "Emeric", "Joran", "Lucan", "Perrin",
                 "Soren", "Matthis", "Ivo", "Casimir")
NAME_STARTS = ("Var", "Bel", "Cor", "Dra", "El", "Fen", "Gal", "Hal", "Ist", "Jor", "Kel", "Lor",
               "Mar", "Nor", "Ost", "Pel", "Quen", "Ros", "Sel", "Tor", "Ul", "Vel", "Wen", "Yar",
               "Zel", "Ber", "Cal", "Dor", "Eld", "Fal", "Gor", "Hel", "Kar", "Lin", "Mor", "Nel",
               "Orm", "Rav", "Sar", "Tal")
NAME_MIDS = ("", "a", "e", "i", "o", "an", "en", "in", "or", "ar", "el", "is")
TOWN_ENDINGS = ("by", "ton", "ford", "ham", "dal", "vik", "stad", "ley", "wick", "mouth")
FAMILY_ENDINGS = ("ard", "ling", "mond", "ric", "wald", "dane", "ross", "vane", "court", "hart")
PLACE_ENDINGS = ("ian", "orn", "ava", "ent", "ad", "ir", "un", "ol", "ek", "as")
