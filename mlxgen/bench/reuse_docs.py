"""Document sets for `mlxgen bench reuse`: the hand-written handbook (reuse_data.DOCS, four
documents) and a generated registry of fictional research stations (any number of documents,
seeded, so every run asks the same questions about the same facts). Prompts of more documents
than a set holds are filled up with station records after the set's own."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .reuse_data import DOCS, QUESTIONS

HANDBOOK_EXTRA = [
    "How many steps lead to the lantern gallery of the lighthouse, and when was the light converted to electricity?",
    "For a French press, which grind setting does the Brevis M4 manual suggest, and how many grams does the hopper hold?",
    "What protein content did Tanager-7 grain have, and which disease is the variety susceptible to?",
    "How much is the Helio Systems home office allowance per month, and what is the hotel limit in capital cities?",
    "When was the statue of Margaret Ellison unveiled, and where does it stand?",
]

NAMES = ["Korvath", "Ilsendt", "Marrow Point", "Teyla", "Obrin", "Vashti", "Quellen", "Darrow",
         "Sunmere", "Hollis", "Brannock", "Eskar", "Pelham", "Zaria", "Tornby", "Wexley",
         "Caldera", "Norrin", "Fenwick", "Amsel"]
FIELDS = ["glaciology", "marine biology", "seismology", "atmospheric chemistry", "ornithology",
          "soil science", "oceanography", "volcanology", "botany", "astronomy"]
REGIONS = ["northern coast", "high plateau", "eastern islands", "southern desert", "river delta",
           "western fjords", "central lowlands", "mountain pass"]
FILLER = [
    "Supplies arrive by {vehicle} every {days} days, weather permitting, and the crew keeps a reserve of food for {reserve} weeks.",
    "The station's main building was extended in {ext}, adding a laboratory, a small library and a drying room for field equipment.",
    "Visitors must register with the station manager at least {notice} days before arriving and attend a safety briefing on the first morning.",
    "Power comes from {power}, with a diesel generator kept for emergencies and tested on the first day of every month.",
    "Data collected at {name} are archived nightly and shared with partner institutes under an open licence after a delay of {delay} months.",
    "The nearest settlement is {dist} kilometres away, and the track is closed for part of the winter when snow or floods make it unsafe.",
    "Each season ends with a public lecture in which the lead scientist summarises the results for the people of the region.",
    "Students on placement stay for at least {weeks} weeks and help with routine measurements, instrument cleaning and the daily log.",
]


@dataclass
class DocSet:
    name: str
    docs: list[str]
    questions: list[str]


def station(i: int, seed: int = 18) -> dict:
    rng = random.Random(seed * 1000 + i)
    return {"name": NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i // len(NAMES) + 1}"),
            "field": rng.choice(FIELDS), "region": rng.choice(REGIONS),
            "founded": rng.randint(1921, 1998), "staff": rng.randint(6, 64),
            "altitude": rng.randint(3, 2900), "lead": rng.choice(
                ["Dr. Ana Reyes", "Dr. Tomas Berg", "Dr. Lin Wei", "Dr. Priya Nair", "Dr. Jonas Keller",
                 "Dr. Sara Okafor", "Dr. Emil Varga", "Dr. Hana Sato"]),
            "budget": rng.randint(12, 95) * 100, "vehicle": rng.choice(["boat", "truck", "helicopter"]),
            "days": rng.randint(5, 30), "reserve": rng.randint(3, 12), "ext": rng.randint(1999, 2020),
            "notice": rng.randint(7, 40), "power": rng.choice(["solar panels", "a wind turbine",
                                                               "a small hydro plant"]),
            "delay": rng.randint(3, 24), "dist": rng.randint(15, 240), "weeks": rng.randint(4, 16),
            "rng": rng}


def station_doc(i: int) -> str:
    s = station(i)
    text = (f"{s['name']} Research Station is a {s['field']} station on the {s['region']}. It was "
            f"founded in {s['founded']} and stands {s['altitude']} metres above sea level. "
            f"{s['staff']} people work there during the main season under the lead scientist "
            f"{s['lead']}, and its yearly budget is {s['budget']} thousand euros. ")
    fillers = list(FILLER)
    s["rng"].shuffle(fillers)
    for _ in range(3):  # enough to pass 512 tokens; fit() cuts at the token budget
        text += " ".join(f.format(**s) for f in fillers) + " "
    return text.strip()


def station_questions(n_docs: int, first: int = 0, count: int = 10) -> list[str]:
    """Questions about station documents first .. first + n_docs - 1, spread over them."""
    forms = [
        "In which year was {name} Research Station founded, and how many people work there during the main season?",
        "Who is the lead scientist at {name} Research Station, and what is its yearly budget?",
        "How high above sea level is {name} Research Station, and what kind of research is done there?",
        "How often do supplies arrive at {name} Research Station, and by what means?",
        "Where does {name} Research Station get its power, and when was its main building extended?",
    ]
    out = []
    for j in range(count):
        i = first + (j * 7 + 3) % n_docs
        out.append(forms[j % len(forms)].format(**station(i)))
    return out


def doc_sets(n_docs: int) -> list[DocSet]:
    """The two sets for prompts of n_docs documents, ten questions each."""
    handbook = DOCS[:n_docs] + [station_doc(100 + i) for i in range(max(0, n_docs - len(DOCS)))]
    stations = [station_doc(i) for i in range(n_docs)]
    return [DocSet("handbook", handbook, QUESTIONS + HANDBOOK_EXTRA),
            DocSet("stations", stations, station_questions(n_docs))]
