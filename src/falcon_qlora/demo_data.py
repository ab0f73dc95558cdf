"""The demo's own dataset: turn a sentence about a person into a one-line JSON contact card.

    falcon-qlora train --config demo                      # uses it through the alias 'demo-guanaco'
    python -m falcon_qlora.demo_data                      # rewrites the shipped files (deterministic)

Every row is written here from small word lists (no row comes from Guanaco or any other dataset), in Guanaco's
'### Human: ... ### Assistant: ...' format. Why this task: it is a small deterministic skill (copy four facts into a
fixed JSON shape, then stop) that SmolLM2-135M does not do out of the box, learns within ~100 CPU steps, and whose
result anyone can check by eye. The held-out split uses first names, surnames and cities that never occur in
training, so a right answer there is extraction, not memorisation.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data" / "demo-guanaco"
N_TRAIN, N_TEST, SEED = 320, 40, 2024

# Word lists: train and held-out pools are disjoint for names and cities; jobs are shared (a fixed vocabulary).
# The training pools are large on purpose: with a few cities only, the model memorises them and writes "Osaka" for
# an unseen "Oslo"; with ~100, copying from the prompt is the only thing that works.
FIRST = {"train": """Alice Bruno Chen Dara Emil Farah Goran Hana Ivo Jana Kofi Lena Marek Nadia Omar Paula Quinn Rosa
                     Sven Tara Umar Vera Wim Yara Zoe Anton Bea Carlos Dmitri Elif Fatima Gideon Helga Igor Jin
                     Karim Leila Mateo Nora Oskar Priya Rafael Saskia Tomas Ursula Viktor Wanda Xavier Yusuf Zara
                     Agnes Boris Clara Diego Esther Felix Gemma Henrik Irene Jamal""".split(),
         "test": "Greta Hugo Ines Jonas Keiko Luis Mila Nils Olga Pavel Ruth Selim Thea Ugo Vivian".split()}
LAST = {"train": """Moreau Silva Wei Novak Haddad Berg Costa Ivanova Okafor Lund Rossi Tanaka Kowalski Nguyen Fischer
                    Mendes Park Larsen Horvat Santos Abbott Bianchi Castro Dumas Eriksen Ferreira Gallo Hoffmann
                    Iqbal Jensen Keller Lopez Mazur Nakamura Olsen Petrov Quist Romero Schmidt Torres Ueda Varga
                    Weber Yilmaz Zimmer Achebe Brandt Cruz Delgado Engel""".split(),
        "test": "Dubois Ortega Sato Lindqvist Kuznetsova Almeida Brennan Chowdhury Falk Ivanic".split()}
CITY = {"train": """Lyon Porto Osaka Gdansk Accra Bergen Quito Leeds Graz Hanoi Kyoto Turin Cork Seville Tartu Nantes
                    Bruges Malmo Krakow Durban Aarhus Bilbao Cairo Dublin Essen Fukuoka Genoa Hamburg Izmir Jaipur
                    Kampala Lagos Madrid Nairobi Odessa Padua Quebec Riga Sapporo Tunis Utrecht Valencia Warsaw
                    Yerevan Zagreb Antwerp Bologna Calgary Dresden Eindhoven Florence Geneva Helsinki Innsbruck
                    Jakarta Kaunas Leipzig Marseille Naples Oxford Palermo Rabat Salzburg Tallinn Uppsala Verona
                    Vienna Windhoek Zurich Adelaide Boston Chicago Denver Edinburgh Glasgow Houston Istanbul
                    Kolkata Lille Manila Nagoya Ottawa Prague Recife Seattle Toronto Vilnius Wellington Bordeaux
                    Cardiff Delft Faro Grenoble Hobart Kiel Lucerne Mumbai""".split(),
        "test": "Lisbon Oslo Dakar Lima Basel Perth Athens Bogota Chennai Dundee Gothenburg Lusaka".split()}
JOBS = ("baker nurse pilot teacher plumber chemist architect farmer librarian carpenter dentist journalist "
        "engineer florist translator").split()

# Prompt phrasings, with the facts in different orders, so the model must read rather than copy by position.
TEMPLATES = [
    "Turn this into a JSON record: {name} is {age}, lives in {city} and works as {a_job}.",
    "Make a contact card for {name}, a {age}-year-old {job} from {city}.",
    "Extract name, age, city and job as JSON: Name: {name}. Age: {age}. Job: {job}. City: {city}.",
    "{name} ({age}) is {a_job} based in {city}. Give me the JSON card.",
    "JSON please: {a_job} called {name}, age {age}, living in {city}.",
    "Write the contact card as JSON. Our new {job} is {name} from {city}, who is {age} years old.",
    "From {city}: {name}, {age}, {job}. Format this person as JSON.",
    "I met {a_job} in {city} named {name}; they are {age}. Put that in a JSON contact card.",
]


def card(name: str, age: int, city: str, job: str) -> str:
    """The answer: always the same keys in the same order, one line."""
    return json.dumps({"name": name, "age": age, "city": city, "job": job})


def make_rows(n: int, split: str, seed: int = SEED) -> list[dict]:
    """n rows for 'train' or 'test'; deterministic for a given seed. One column, 'text', as in Guanaco."""
    r = random.Random(f"{seed}-{split}")
    rows = []
    for _ in range(n):
        name = f"{r.choice(FIRST[split])} {r.choice(LAST[split])}"
        facts = dict(name=name, age=r.randint(19, 79), city=r.choice(CITY[split]), job=r.choice(JOBS))
        a_job = ("an " if facts["job"][0] in "aeiou" else "a ") + facts["job"]
        prompt = r.choice(TEMPLATES).format(a_job=a_job, **facts)
        rows.append({"text": f"### Human: {prompt} ### Assistant: {card(**facts)}"})
    return rows


def write(out_dir: Path = DATA_DIR) -> Path:
    """Write train.jsonl and test.jsonl (the shipped files are exactly this function's output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        lines = "".join(json.dumps(row) + "\n" for row in make_rows(n, split))
        (out_dir / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return out_dir


def dataset_path() -> str:
    """The folder holding the shipped splits (the target of the 'demo-guanaco' alias)."""
    return str(DATA_DIR)


if __name__ == "__main__":
    print(f"wrote {write()}")
