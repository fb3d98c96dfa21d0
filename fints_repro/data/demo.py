"""SYNTHETIC demo data (``dataset=demo_news``): LaMP-4-style personalised headlines.

Nothing in this module is real news. Every article, person, organisation, place and
number is made up from the templates below, deterministically from a seed, so that the
framework can be tried end to end without downloading LaMP. The samples look like
LaMP-4: the input is ``"Generate a headline for the following article: " + article``,
the target is the headline *this user* would write, and the history holds the user's
earlier (article, headline) pairs, oldest first, with increasing integer timestamps
(seconds since the Unix epoch, at midnight UTC, so each maps to one ISO date).

How the data is built
---------------------
* **Articles.** Each article comes from one *topic* (politics, sports, tech, science,
  business, health, culture, weather, education). A topic has entities, events, quotes,
  speakers and context sentences (all in :data:`TOPICS`). An article is a lead sentence
  (entity, event verb, object, place, weekday of the item's date, detail), two event
  sentences with numbers, a quote, and sometimes a context sentence or a closer:
  4-5 sentences, about 60-90 words.
* **Key facts and the neutral headline.** The facts of an article (entity, event verb,
  object, place, detail ...) are kept in ``meta["facts"]``; the neutral "base headline"
  that a generic model would write is :func:`base_headline`:
  ``"{entity} {verb_s} {obj} in {place}"``, e.g. "Novalink recalls 40,000 smart speakers
  in Ashford".
* **Users and styles.** Every user writes all their headlines in one *style* (in
  :data:`STYLES`), a template over the same facts, consistent across the user's history
  and test items and clearly different from the neutral headline:

  ===================  ==========================================================
  ``question``         "Will Novalink recall 40,000 smart speakers?"
  ``breaking``         "BREAKING: Novalink recalls 40,000 smart speakers"
  ``lowercase_casual`` "novalink just recalled 40,000 smart speakers in ashford"
  ``listicle``         "5 things to know as Novalink recalls 40,000 smart speakers"
  ``colon_place``      "Ashford: Novalink recalls 40,000 smart speakers"
  ``very_short``       "Novalink recalls smart speakers"  (at most 5 words)
  ``long_detailed``    "Novalink recalls 40,000 smart speakers in Ashford on Monday,
                       over an overheating risk, in what observers call a pivotal
                       moment"
  ``heres_why``        "Here's why Novalink recalled 40,000 smart speakers"
  ``city_desk``        "Novalink recalls 40,000 smart speakers | City Desk"
  ``moves_to``         "Novalink moves to recall 40,000 smart speakers" (favourite
                       phrasing)
  ===================  ==========================================================

  Users get styles round-robin over a seeded permutation of the styles, so every style
  appears once ``n_users >= len(STYLES)``. Each user favours 2-3 topics (85 % of their
  items come from them), so retrieval over the history matters.
* **Drift** (``drift=True``, the paper's fast-changing setting): each user has an old and
  a new style (always different); the last 40 % of the history and all test items use
  the new style. ``meta["style"]`` is the style of the item's own headline.

Determinism: each user draws from its own ``random.Random`` seeded with a string built
from ``seed`` and the user index (string seeds are hashed with SHA-512 by ``random``, not
with Python's randomised ``hash``), and nothing depends on dict or set iteration order
beyond the fixed insertion order of the data below. Same arguments, same output; adding
users leaves the earlier users unchanged.

To extend: add a dict to :data:`STYLES` (a ``template`` over the fact names, optional
``case``, a ``marker`` regex that every headline of the style matches) or an event, entity
or topic to :data:`TOPICS`.
"""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from fints_repro.data.schema import HistoryItem, Sample

PROMPT = "Generate a headline for the following article: "

# Defaults sized for a 135M model on a 2-core CPU (the framework's DemoDataConfig).
DEFAULT_N_USERS = 8
DEFAULT_N_HISTORY = 12
DEFAULT_N_TEST = 4

# Share of a user's items drawn from the user's favoured topics.
FAVOURED_TOPIC_PROB = 0.85
# Under drift, the last DRIFT_TAIL_FRACTION of the history uses the new style.
DRIFT_TAIL_FRACTION = 0.4

# --------------------------------------------------------------------------------------
# Styles: how a user turns an article's facts into a headline. Fact names available to a
# template: entity, entity_short, verb_base, verb_s, verb_past, obj, obj_short, place,
# detail, weekday, topic. ``case``: "lower" lower-cases the result. ``marker``: a regex
# every headline of the style matches (used by the tests and handy for analysis).
# --------------------------------------------------------------------------------------

BASE_TEMPLATE = "{entity} {verb_s} {obj} in {place}"

STYLES: dict[str, dict[str, str]] = {
    "question": {
        "description": "asks a yes/no question, no place",
        "template": "Will {entity} {verb_base} {obj}?",
        "marker": r"^Will .+\?$",
    },
    "breaking": {
        "description": "fixed prefix 'BREAKING:', no place",
        "template": "BREAKING: {entity} {verb_s} {obj}",
        "marker": r"^BREAKING: \S",
    },
    "lowercase_casual": {
        "description": "all lower case, chatty 'just' + past tense",
        "template": "{entity} just {verb_past} {obj} in {place}",
        "case": "lower",
        "marker": r"^[^A-Z]* just [^A-Z]*$",
    },
    "listicle": {
        "description": "listicle opener '5 things to know as ...'",
        "template": "5 things to know as {entity} {verb_s} {obj}",
        "marker": r"^5 things to know as \S",
    },
    "colon_place": {
        "description": "'Place: entity verbs object'",
        "template": "{place}: {entity} {verb_s} {obj}",
        "marker": r"^[A-Z][a-z]+(?: [A-Z][a-z]+)?: [A-Z]",
    },
    "very_short": {
        "description": "telegraphic, at most 5 words (short entity and object)",
        "template": "{entity_short} {verb_s} {obj_short}",
        "marker": r"^\S+(?: \S+){0,4}$",
    },
    "long_detailed": {
        "description": "long: place, weekday, detail and a fixed closing phrase",
        "template": ("{entity} {verb_s} {obj} in {place} on {weekday}, {detail}, "
                     "in what observers call a pivotal moment"),
        "marker": r"^(?=(?:\S+ ){14}\S).*, in what observers call a pivotal moment$",
    },
    "heres_why": {
        "description": "explainer opener 'Here's why ...' + past tense",
        "template": "Here's why {entity} {verb_past} {obj}",
        "marker": r"^Here's why \S",
    },
    "city_desk": {
        "description": "fixed suffix '| City Desk'",
        "template": "{entity} {verb_s} {obj} | City Desk",
        "marker": r" \| City Desk$",
    },
    "moves_to": {
        "description": "favourite phrasing 'moves to' + base verb",
        "template": "{entity} moves to {verb_base} {obj}",
        "marker": r"^\S.* moves to \S",
    },
}

STYLE_NAMES: tuple[str, ...] = tuple(STYLES)

# --------------------------------------------------------------------------------------
# Article material. Slots in braces are filled from the facts and from per-article
# numbers (see _draw_slots). Every entity short name is one word and every short object
# at most two, so ``very_short`` headlines have at most five words.
# --------------------------------------------------------------------------------------

PLACES: tuple[str, ...] = (
    "Oakridge", "Port Elliot", "Brookhaven", "Cedar Falls", "Millbrook", "Ashford",
    "Silverton", "Kingsport", "Fairview", "Lindale", "Greyhaven", "Westmoor",
)
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                             "Saturday", "Sunday")
FIRST_NAMES: tuple[str, ...] = (
    "Anna", "Marcus", "Leila", "Tom", "Grace", "Victor", "Nina", "Omar", "Sara", "Felix",
    "Hana", "Diego", "Ruth", "Kenji", "Amara", "Paul",
)
LAST_NAMES: tuple[str, ...] = (
    "Moreno", "Lindqvist", "Okafor", "Bennett", "Castillo", "Novak", "Haddad", "Price",
    "Yamada", "Kowalski", "Mensah", "Duarte", "Keller", "Abbott", "Singh", "Farrow",
)
STARTUPS: tuple[str, ...] = ("Tiltwise", "Bytehive", "Lumora", "Datapond", "Vectrix")
RIVALS: tuple[str, ...] = ("Northstar Group", "Pinecone Holdings", "Blueriver Industries",
                           "Crestline Partners")
ORDINALS: tuple[str, ...] = ("second", "third", "fourth", "fifth")
WHEN: tuple[str, ...] = ("later this week", "next month", "in the coming days",
                         "before the end of the year")
QUOTE_SETTINGS: tuple[str, ...] = (
    "speaking to reporters on {weekday}", "in a written statement",
    "at a news conference in {place}", "in an interview with local radio",
)
CLOSERS: tuple[str, ...] = (
    "More details are expected {when}.",
    "Further updates are expected {when}.",
    "A fuller picture should emerge {when}.",
)


def _ev(verb: tuple[str, str, str], obj: str, obj_np: str, obj_short: str, detail: str,
        body: tuple[str, str]) -> dict[str, Any]:
    """One event: verb forms (base, 3rd person, past), headline object, the object as it
    reads in running text, a short object (<= 2 words), a detail phrase, two sentences."""
    return {"verb": verb, "obj": obj, "obj_np": obj_np, "obj_short": obj_short,
            "detail": detail, "body": body}


TOPICS: dict[str, dict[str, Any]] = {
    "politics": {
        "entities": (("Governor Maria Alvarez", "Alvarez"), ("Senator Dana Whitfield", "Whitfield"),
                     ("Mayor Luis Ortega", "Ortega"), ("Prime Minister Elena Varga", "Varga"),
                     ("Harbor City Council", "Council"), ("Commissioner Ben Adler", "Adler")),
        "events": (
            _ev(("approve", "approves", "approved"), "${money} million transit budget",
                "a ${money} million transit budget", "transit budget", "after a {vote_a}-{vote_b} vote",
                ("The plan pays for {small} new bus lines and long-delayed repairs to aging rail stations.",
                 "Supporters said the money would cut average commute times by about {pct} percent by {year}.")),
            _ev(("reject", "rejects", "rejected"), "tax on ride-share trips",
                "a proposed tax on ride-share trips", "ride-share tax",
                "following {mid} minutes of heated debate",
                ("The measure would have added a {pct}-cent fee to every ride booked through an app.",
                 "Drivers had rallied outside city hall for {small} days to oppose the idea.")),
            _ev(("announce", "announces", "announced"), "re-election bid", "a re-election bid",
                "re-election bid", "in front of about {big} supporters",
                ("The campaign will focus on housing costs, public safety and road repairs.",
                 "Recent polling puts approval at {approval} percent, up {small} points since spring.")),
            _ev(("sign", "signs", "signed"), "housing reform bill", "a sweeping housing reform bill",
                "housing bill", "after months of negotiations",
                ("The law lets builders add up to {small} apartments on lots once reserved for single homes.",
                 "Officials estimate it could create {k},000 new homes over the next decade.")),
            _ev(("unveil", "unveils", "unveiled"), "plan to cut wait times at public offices",
                "a plan to cut wait times at public offices", "service plan",
                "promising results within {small} months",
                ("Residents currently wait an average of {mid} minutes to renew a license or permit.",
                 "The plan adds online booking and {small2} new service counters.")),
        ),
        "quotes": ("This is about making daily life easier for working families",
                   "We listened to residents, and this is what they asked for",
                   "Nobody got everything they wanted, but this is a fair outcome",
                   "We will be watching closely to make sure the promises are kept"),
        "speakers": ("{person}, a spokesperson for {entity_short}", "{person}, an opposition council member",
                     "{person}, a political analyst at Kestrel University"),
        "context": ("The decision comes weeks before budget talks for {year} begin.",
                    "Opposition members said they would keep pushing for changes.",
                    "A public hearing on the details is planned for next month."),
    },
    "sports": {
        "entities": (("Rivertown FC", "Rivertown"), ("Northbay United", "Northbay"),
                     ("Westfield Rovers", "Westfield"), ("Lakeside Comets", "Comets"),
                     ("Summit City Rangers", "Rangers"), ("Eastport Mariners", "Mariners")),
        "events": (
            _ev(("win", "wins", "won"), "regional championship", "the regional championship", "title",
                "with a {score_a}-{score_b} victory in the final",
                ("It is the club's first title in {small} years.",
                 "A crowd of {k},000 fans watched the final, many travelling from out of town.")),
            _ev(("sign", "signs", "signed"), "striker {p2}", "striker {p2}", "new striker",
                "on a {small}-year deal",
                ("The {age}-year-old scored {goals} goals last season for a rival club.",
                 "The fee was not disclosed, but local media put it near ${fee} million.")),
            _ev(("fire", "fires", "fired"), "head coach", "its head coach", "head coach",
                "after {small} straight losses",
                ("The team has dropped to {rank}th place in the league standings.",
                 "An assistant will lead training until a permanent replacement is found.")),
            _ev(("open", "opens", "opened"), "{k},000-seat stadium", "a new {k},000-seat stadium",
                "new stadium", "after {small} years of construction",
                ("The venue cost ${money} million and includes a rooftop solar array.",
                 "The first match is scheduled for next weekend against a local rival.")),
            _ev(("extend", "extends", "extended"), "unbeaten run to {goals} games",
                "its unbeaten run to {goals} games", "unbeaten run", "with a late goal in stoppage time",
                ("The streak is now the longest in the league in {small} seasons.",
                 "The manager credited a younger squad and a tighter defence.")),
        ),
        "quotes": ("Everyone at the club wants the same thing, and that is success",
                   "We knew this would be a tough season, but the group never gave up",
                   "It is a big moment for the club and for the whole town",
                   "We have a lot of work ahead, but this is a start"),
        "speakers": ("{person}, a spokesperson for {entity}", "{person}, the team captain",
                     "{person}, a longtime season-ticket holder"),
        "context": ("The club sits {rank}th in the league table with {small2} games left.",
                    "Local bars were packed with fans following the news.",
                    "The league said it would review the schedule for the rest of the season."),
    },
    "tech": {
        "entities": (("Novalink", "Novalink"), ("Brightwave Systems", "Brightwave"),
                     ("Quantix", "Quantix"), ("Pixelforge", "Pixelforge"), ("Cloudnest", "Cloudnest"),
                     ("Arcadia Labs", "Arcadia")),
        "events": (
            _ev(("launch", "launches", "launched"), "foldable smartphone", "its first foldable smartphone",
                "foldable phone", "priced at ${price}",
                ("The device folds into a square the size of a wallet and weighs {grams} grams.",
                 "Preorders open on Friday in {small} countries.")),
            _ev(("recall", "recalls", "recalled"), "{k},000 smart speakers", "{k},000 smart speakers",
                "smart speakers", "over an overheating risk",
                ("The company said {small} customers reported minor burns from the charging base.",
                 "Owners can return the devices to any store for a full refund.")),
            _ev(("acquire", "acquires", "acquired"), "startup {startup}", "the startup {startup}",
                "startup", "in a deal worth ${money} million",
                ("{startup} makes software that helps small shops track inventory.",
                 "Its {mid} employees will join the buyer's cloud division.")),
            _ev(("cut", "cuts", "cut"), "{big} jobs", "{big} jobs", "jobs",
                "amid slowing sales for the {ordinal} straight quarter",
                ("The cuts amount to about {pct} percent of the workforce.",
                 "Affected staff will receive {small} months of severance pay.")),
            _ev(("release", "releases", "released"), "AI writing assistant", "an AI writing assistant",
                "AI assistant", "for {mid} million users",
                ("The tool drafts emails and summarises long documents in seconds.",
                 "It will be free for the first {small} months before a monthly fee kicks in.")),
        ),
        "quotes": ("We think this will change how people use their devices every day",
                   "Safety and trust come first for us",
                   "This is a big bet on where the industry is heading",
                   "Customers have been asking for this for years"),
        "speakers": ("{person}, a spokesperson for {entity}", "{person}, a technology analyst at Brightline Research",
                     "{person}, the company's chief executive"),
        "context": ("Shares of the company moved {small} percent after the announcement.",
                    "Competitors have made similar moves in recent months.",
                    "The company will share more details at its developer conference."),
    },
    "science": {
        "entities": (("Kestrel University", "Kestrel"), ("Polaris Institute", "Polaris"),
                     ("Meridian Observatory", "Meridian"), ("Halden Research Center", "Halden"),
                     ("Aurora Space Agency", "Aurora"), ("Brookfield Marine Lab", "Brookfield")),
        "events": (
            _ev(("discover", "discovers", "discovered"), "new species of deep-sea fish",
                "a new species of deep-sea fish", "new fish", "at a depth of {depth} meters",
                ("The fish is about {small} centimeters long and glows faintly in the dark.",
                 "Researchers collected {small2} specimens during a {mid}-day expedition.")),
            _ev(("launch", "launches", "launched"), "climate monitoring satellite",
                "a climate monitoring satellite", "climate satellite", "on a rocket from a coastal pad",
                ("The satellite will track sea ice and ocean temperatures for at least {small} years.",
                 "Its instruments can spot changes as small as {small2} centimeters in sea level.")),
            _ev(("publish", "publishes", "published"), "study linking sleep and memory",
                "a study linking sleep and memory", "sleep study", "based on data from {big} volunteers",
                ("People who slept less than {hours} hours remembered {pct} percent fewer words the next day.",
                 "The team plans a larger follow-up study in {year}.")),
            _ev(("detect", "detects", "detected"), "radio signal from distant galaxy",
                "a repeating radio signal from a distant galaxy", "galaxy signal",
                "using a new array of {mid} antennas",
                ("The signal repeats roughly every {small} hours and has puzzled astronomers.",
                 "Scientists say it likely comes from a rapidly spinning dead star.")),
            _ev(("test", "tests", "tested"), "prototype fusion reactor", "a prototype fusion reactor",
                "fusion reactor", "holding plasma stable for {mid} seconds",
                ("The previous record for a reactor of this size was {small} seconds.",
                 "Engineers hope to build a full-scale version by {year}.")),
        ),
        "quotes": ("This opens a door we did not even know was there",
                   "It took years of careful work to get here",
                   "We are only beginning to understand what this means",
                   "This is a proud day for everyone on the team"),
        "speakers": ("{person}, a lead researcher at {entity}", "{person}, an independent scientist who reviewed the work",
                     "{person}, a professor of physics at Carver State University"),
        "context": ("The findings were reviewed by independent experts before publication.",
                    "The project was funded by a ${money} million public grant.",
                    "Other teams are expected to try to repeat the results."),
    },
    "business": {
        "entities": (("Granite Bank", "Granite"), ("Sunfield Foods", "Sunfield"), ("Atlas Motors", "Atlas"),
                     ("Harborline Shipping", "Harborline"), ("Veridian Energy", "Veridian"),
                     ("Copperleaf Retail", "Copperleaf")),
        "events": (
            _ev(("report", "reports", "reported"), "{pct}% jump in quarterly profit",
                "a {pct} percent jump in quarterly profit", "profit jump", "beating analyst forecasts",
                ("Revenue rose to ${money} million, driven by strong demand overseas.",
                 "Shares climbed {small} percent in early trading.")),
            _ev(("cut", "cuts", "cut"), "prices on {big} products", "prices on {big} products", "prices",
                "as shoppers watch their budgets",
                ("The reductions average {pct} percent and take effect on Monday.",
                 "Rivals are expected to follow with cuts of their own.")),
            _ev(("open", "opens", "opened"), "new factory", "a new factory", "new factory",
                "creating {big} jobs",
                ("The plant cost ${money} million and will run mostly on renewable power.",
                 "Production is expected to reach full capacity within {small} months.")),
            _ev(("merge with", "merges with", "merged with"), "rival {rival}", "rival {rival}", "rival",
                "in a ${money} million deal",
                ("The combined company will employ about {k},000 people.",
                 "Regulators have {small} months to review the agreement.")),
            _ev(("raise", "raises", "raised"), "wages for {big} workers", "wages for {big} workers", "wages",
                "starting next month",
                ("The increase averages {pct} percent and follows months of staff shortages.",
                 "A union representative called the move overdue but welcome.")),
        ),
        "quotes": ("Our customers are at the center of every decision we make",
                   "This positions us well for the years ahead",
                   "It was a difficult choice, but the right one",
                   "We are investing in the communities where we work"),
        "speakers": ("{person}, a spokesperson for {entity}", "{person}, a market analyst at Lumen Capital",
                     "{person}, the company's finance chief"),
        "context": ("The company has operated in the region for {mid} years.",
                    "Analysts said the move reflects wider pressure across the industry.",
                    "Investors will get more details at the annual meeting."),
    },
    "health": {
        "entities": (("Surgeon General Ruth Ames", "Ames"), ("Dr. Priya Nair", "Nair"),
                     ("Riverside Medical Center", "Riverside"), ("Northside Clinic", "Northside"),
                     ("Mercy Children's Hospital", "Mercy"), ("Health Minister Karl Jensen", "Jensen")),
        "events": (
            _ev(("warn of", "warns of", "warned of"), "rising flu cases", "rising flu cases", "flu surge",
                "as clinics fill up",
                ("Reported cases are up {pct} percent compared with the same week last year.",
                 "Residents were urged to get vaccinated and to stay home when sick.")),
            _ev(("open", "opens", "opened"), "new cancer treatment wing", "a new cancer treatment wing",
                "cancer wing", "with {mid} patient beds",
                ("The wing cost ${money} million and includes {small} new radiation machines.",
                 "Staff expect to treat about {big} patients in the first year.")),
            _ev(("expand", "expands", "expanded"), "free vaccination program", "a free vaccination program",
                "vaccine program", "to cover {k},000 more children",
                ("Clinics will offer extended evening hours {small} days a week.",
                 "Officials said the program has already cut measles cases by {pct} percent.")),
            _ev(("report", "reports", "reported"), "drop in emergency room wait times",
                "a sharp drop in emergency room wait times", "shorter waits", "after hiring {mid} nurses",
                ("The average wait fell by {pct} percent over the past {small} months.",
                 "Patients also reported higher satisfaction in a recent survey.")),
            _ev(("launch", "launches", "launched"), "mental health hotline",
                "a round-the-clock mental health hotline", "health hotline", "staffed by {mid} counselors",
                ("Callers can reach a trained counselor in under {small} minutes.",
                 "The service will be free and available in {small2} languages.")),
        ),
        "quotes": ("Our priority is getting patients the care they need, when they need it",
                   "Small steps like washing hands still make a big difference",
                   "We are doing everything we can to keep families in the region safe",
                   "We still have a lot of work to do"),
        "speakers": ("{person}, a spokesperson for {entity}", "{person}, a nurse at a local hospital",
                     "{person}, a public health expert at Kestrel University"),
        "context": ("Hospitals across the region have reported heavy demand this year.",
                    "The state set aside ${money} million for health programs this year.",
                    "Patients can find more information on the health department's website."),
    },
    "culture": {
        "entities": (("Singer Jonah Blake", "Blake"), ("Pianist Mei Tanaka", "Tanaka"),
                     ("Rapper Dex Monroe", "Monroe"), ("Violinist Clara Holm", "Holm"),
                     ("Songwriter Ava Reid", "Reid"), ("Drummer Sam Okoro", "Okoro")),
        "events": (
            _ev(("release", "releases", "released"), "new album", "a new album", "new album",
                "featuring {tracks} new songs",
                ("The record was written over {small} years and recorded in a converted barn.",
                 "Early reviews praised its quieter, more personal sound.")),
            _ev(("announce", "announces", "announced"), "world tour", "a {mid}-city world tour", "world tour",
                "starting in the spring",
                ("Tickets go on sale on Friday, with prices starting at ${ticket}.",
                 "The tour includes {small} stops in cities never visited before.")),
            _ev(("cancel", "cancels", "cancelled"), "{small} concerts", "{small} concerts", "concerts",
                "citing a wrist injury",
                ("Fans who bought tickets will receive full refunds within {small2} weeks, organisers said.",
                 "Doctors have advised at least a month of rest before any return to the stage.")),
            _ev(("win", "wins", "won"), "national music prize", "the national music prize", "music prize",
                "beating {small} other finalists",
                ("The award comes with ${k},000 in prize money.",
                 "In a short speech, the winner thanked teachers from a childhood music school.")),
            _ev(("donate", "donates", "donated"), "concert proceeds to flood relief",
                "all proceeds from a benefit concert to flood relief", "concert proceeds",
                "raising ${k},000",
                ("More than {big} people attended the sold-out show.",
                 "The money will help families rebuild homes damaged in last month's floods.")),
        ),
        "quotes": ("I wanted to make something honest, and I hope people feel that",
                   "The fans have stood by me through everything",
                   "Music has always been my way of giving back",
                   "I owe everything to the people who come to the shows"),
        "speakers": ("{entity_short}", "{person}, the artist's manager", "{person}, a music critic"),
        "context": ("The announcement drew thousands of comments online within hours.",
                    "Critics have called the artist one of the most original voices of the decade.",
                    "The artist's last project topped the charts for {small} weeks."),
    },
    "weather": {
        "entities": (("Storm Bianca", "Bianca"), ("Storm Corwin", "Corwin"), ("Storm Delia", "Delia"),
                     ("Tropical Storm Emil", "Emil"), ("Storm Farah", "Farah"), ("Storm Gideon", "Gideon")),
        "events": (
            _ev(("hit", "hits", "hit"), "coast with {mph} mph winds", "the coast with winds of {mph} mph",
                "coast", "tearing roofs off {small} buildings",
                ("Forecasters said it was the strongest storm to reach the area in {mid} years.",
                 "Ferries were cancelled and {small2} bridges closed to traffic.")),
            _ev(("knock out", "knocks out", "knocked out"), "power to {k},000 homes", "power to {k},000 homes",
                "power", "leaving streets dark",
                ("Crews expect to restore most service within {small} days.",
                 "Utility officials urged residents to stay away from downed lines.")),
            _ev(("dump", "dumps", "dumped"), "{small} inches of rain", "{small} inches of rain", "heavy rain",
                "flooding dozens of streets",
                ("Several rivers rose above flood stage by early afternoon.",
                 "Emergency teams rescued {mid} people from stranded cars.")),
            _ev(("force", "forces", "forced"), "evacuation of {big} residents", "the evacuation of {big} residents",
                "evacuations", "amid rising rivers",
                ("Shelters opened at {small} schools and a sports hall.",
                 "Officials said residents could return once the water recedes.")),
            _ev(("close", "closes", "closed"), "schools and highways", "schools and highways", "schools",
                "with snow drifts up to {small} feet",
                ("Plows worked through the night to clear {mid} miles of main roads.",
                 "Forecasters expect temperatures to stay below freezing for {small2} days.")),
        ),
        "quotes": ("Please stay indoors and off the roads until the all-clear",
                   "We have crews ready to move as soon as it is safe",
                   "This is a serious event and people should take it seriously",
                   "Check on your neighbours, especially the elderly"),
        "speakers": ("{person}, a forecaster at the National Weather Service",
                     "{person}, the county emergency manager", "{person}, a spokesperson for the local utility"),
        "context": ("Schools in the area announced closures for the rest of the week.",
                    "Insurance companies said claims were already coming in.",
                    "Forecasters warned another system could arrive next week."),
    },
    "education": {
        "entities": (("Westbrook School District", "Westbrook"), ("Lincoln High School", "Lincoln"),
                     ("Carver State University", "Carver"), ("Principal Nora Hale", "Hale"),
                     ("Superintendent Omar Diaz", "Diaz"), ("Pinecrest Academy", "Pinecrest")),
        "events": (
            _ev(("extend", "extends", "extended"), "school day by {mid} minutes",
                "the school day by {mid} minutes", "school day", "starting next term",
                ("The extra time will go to reading and math support.",
                 "Teachers will receive a {pct} percent pay increase for the longer hours.")),
            _ev(("ban", "bans", "banned"), "phones in classrooms", "phones in classrooms", "phones",
                "after a {small}-month trial",
                ("Students will lock their devices in pouches at the start of each day.",
                 "Teachers reported {pct} percent fewer disruptions during the trial.")),
            _ev(("hire", "hires", "hired"), "{mid} new teachers", "{mid} new teachers", "teachers",
                "to shrink class sizes",
                ("Average class size is expected to fall from {cls} to {cls2} students.",
                 "The hires are funded by a new state grant.")),
            _ev(("raise", "raises", "raised"), "after-school fees", "fees for after-school programs", "fees",
                "in a {vote_a}-{vote_b} board vote",
                ("Families will pay about ${ticket} more per term.",
                 "Officials said the money will keep {small} programs from closing.")),
            _ev(("launch", "launches", "launched"), "free lunch program", "a free lunch program",
                "free lunch", "for {big} students",
                ("Meals will be cooked on site using produce from local farms.",
                 "Parents no longer need to fill out an application to qualify.")),
        ),
        "quotes": ("Every decision we make starts with what is best for students",
                   "Our teachers have been asking for this for a long time",
                   "Change is never easy, but this is the right direction",
                   "We want every child to leave school ready for what comes next"),
        "speakers": ("{person}, a spokesperson for {entity}", "{person}, a parent of two students",
                     "{person}, the head of the local teachers union"),
        "context": ("Parents will be able to ask questions at a meeting next week.",
                    "The school board will review the results at the end of the year.",
                    "Enrollment in the area has grown by {pct} percent over {small2} years."),
    },
}

TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)

# Article length bounds (words); an article is rebuilt with more/fewer optional sentences
# to land inside them.
MIN_WORDS, MAX_WORDS = 60, 120

# First day of the synthetic calendar, and the gap (days) between consecutive items.
EPOCH_START = datetime(2023, 1, 2, tzinfo=timezone.utc)
DAY = 86400
GAP_DAYS = (1, 6)


# --------------------------------------------------------------------------------------
# Headlines
# --------------------------------------------------------------------------------------

def render_headline(style: str, facts: dict[str, str]) -> str:
    """The headline a user of ``style`` writes for an article with these facts."""
    spec = STYLES[style]
    text = spec["template"].format(**facts)
    if spec.get("case") == "lower":
        text = text.lower()
    return text


def base_headline(facts: dict[str, str]) -> str:
    """The neutral headline from an article's key facts (what a generic model writes)."""
    return BASE_TEMPLATE.format(**facts)


def timestamp_to_date(ts: float) -> str:
    """ISO date (YYYY-MM-DD, UTC) of an integer timestamp in seconds."""
    return datetime.fromtimestamp(int(ts), tz=timezone.utc).date().isoformat()


# --------------------------------------------------------------------------------------
# Articles
# --------------------------------------------------------------------------------------

def _draw_slots(rng: random.Random) -> dict[str, Any]:
    """Numbers and names an article may use (drawn in a fixed order)."""
    return {
        "money": rng.randint(12, 480), "vote_a": rng.randint(5, 9), "vote_b": rng.randint(1, 4),
        "small": rng.randint(2, 6), "small2": rng.randint(2, 6), "mid": rng.randint(12, 95),
        "big": rng.randint(12, 95) * 10, "k": rng.randint(10, 90), "pct": rng.randint(3, 38),
        "approval": rng.randint(31, 64), "year": rng.randint(2026, 2031),
        "score_a": rng.randint(2, 5), "score_b": rng.randint(0, 1), "age": rng.randint(19, 31),
        "goals": rng.randint(11, 29), "fee": rng.randint(2, 40), "rank": rng.randint(14, 19), "price": rng.choice((699, 899, 999, 1299, 1499)),
        "grams": rng.randint(180, 260), "depth": rng.randint(12, 48) * 100, "hours": rng.randint(5, 6),
        "mph": rng.randint(55, 110), "tracks": rng.randint(9, 16), "ticket": rng.randint(35, 120),
        "cls": rng.randint(28, 34), "cls2": rng.randint(20, 25),
        "ordinal": rng.choice(ORDINALS), "startup": rng.choice(STARTUPS), "rival": rng.choice(RIVALS),
        "p2": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "person": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "when": rng.choice(WHEN),
    }


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_article(rng: random.Random, topic: str, weekday: str) -> tuple[str, dict[str, str]]:
    """One article of ``topic`` about an event on ``weekday``, and its key facts."""
    t = TOPICS[topic]
    entity, entity_short = rng.choice(t["entities"])
    ev = rng.choice(t["events"])
    place = rng.choice(PLACES)
    slots = _draw_slots(rng)
    slots.update(entity=entity, entity_short=entity_short, place=place, weekday=weekday)

    def fill(s: str) -> str:
        return s.format(**slots)

    base, s3, past = ev["verb"]
    facts = {
        "topic": topic, "entity": entity, "entity_short": entity_short,
        "verb_base": base, "verb_s": s3, "verb_past": past,
        "obj": fill(ev["obj"]), "obj_short": ev["obj_short"],
        "place": place, "detail": fill(ev["detail"]), "weekday": weekday,
    }
    lead = f"{entity} {past} {fill(ev['obj_np'])} in {place} on {weekday}, {facts['detail']}."
    body = [fill(b) for b in ev["body"]]
    quote = (f"\"{rng.choice(t['quotes'])},\" said {fill(rng.choice(t['speakers']))}, "
             f"{fill(rng.choice(QUOTE_SETTINGS))}.")
    context = fill(rng.choice(t["context"]))
    closer = fill(rng.choice(CLOSERS))
    # Sentences: lead, both event sentences, the quote, then a context sentence or a
    # closer (4-5 sentences); the optional one is always added to a short article.
    extra = rng.choice((context, closer))
    parts = [lead, body[0], quote, body[1]]
    text = " ".join(_cap(p) for p in parts)
    if len(text.split()) < MIN_WORDS or rng.random() < 0.5:
        if len(text.split()) < MIN_WORDS:
            extra = max((context, closer), key=lambda x: len(x.split()))
        if extra is context:
            parts.insert(3, extra)
        else:
            parts.append(extra)
        text = " ".join(_cap(p) for p in parts)
    return text, facts


def distinct_article(rng: random.Random, topic: str, weekday: str, seen: set[str]
                     ) -> tuple[str, dict[str, str]]:
    """An article (and its facts) not in ``seen``, which it is added to."""
    for _ in range(1000):
        article, facts = make_article(rng, topic, weekday)
        if article not in seen:
            seen.add(article)
            return article, facts
    raise RuntimeError("could not draw a distinct synthetic article")  # pragma: no cover


# --------------------------------------------------------------------------------------
# Users and samples
# --------------------------------------------------------------------------------------

def _style_plan(n_users: int, seed: int, drift: bool) -> list[tuple[str, str]]:
    """(old style, new style) per user: round-robin over a seeded permutation, so every
    style appears once n_users >= len(STYLES); under drift, new = a fixed shift of old
    (never equal), which is also a bijection, so every new style appears too."""
    rng = random.Random(f"demo_news/styles/{seed}")
    perm = list(STYLE_NAMES)
    rng.shuffle(perm)
    shift = rng.randrange(1, len(perm))
    plan = []
    for u in range(n_users):
        old = perm[u % len(perm)]
        new = perm[(u + shift) % len(perm)] if drift else old
        plan.append((old, new))
    return plan


def generate_demo_news(*, n_users: int, n_history: int, n_test: int, seed: int,
                       drift: bool = False) -> list[Sample]:
    """SYNTHETIC LaMP-4-style samples: ``n_users`` users, each with ``n_test`` test samples
    sharing the user's ``n_history`` earlier (article, headline) items.

    Samples are ordered by user, then by time. ``meta`` of a sample holds ``synthetic``,
    ``style`` (the style of its target), ``topic``, ``facts``, ``base_headline`` (the
    neutral headline), ``user_topics``, ``drift``, ``old_style`` and ``new_style``; each
    history item's ``meta`` holds ``synthetic``, ``style``, ``topic``, ``facts`` and
    ``base_headline``.
    """
    if n_users < 0 or n_history < 0 or n_test < 0:
        raise ValueError("n_users, n_history and n_test must be >= 0")
    plan = _style_plan(n_users, seed, drift)
    n_new = math.ceil(DRIFT_TAIL_FRACTION * n_history) if drift else n_history
    seen_articles: set[str] = set()
    samples: list[Sample] = []
    for u in range(n_users):
        old_style, new_style = plan[u]
        rng = random.Random(f"demo_news/user/{seed}/{u}")
        user = f"demo_user_{u:02d}"
        favoured = rng.sample(TOPIC_NAMES, rng.choice((2, 3)))

        def draw(style: str, ts: int) -> tuple[str, str, dict[str, Any]]:
            # the event happened on the weekday of the item's date
            weekday = WEEKDAYS[datetime.fromtimestamp(ts, tz=timezone.utc).weekday()]
            topic = (rng.choice(favoured) if rng.random() < FAVOURED_TOPIC_PROB
                     else rng.choice(TOPIC_NAMES))
            article, facts = distinct_article(rng, topic, weekday, seen_articles)
            meta = {"synthetic": True, "style": style, "topic": topic, "facts": facts,
                    "base_headline": base_headline(facts)}
            return article, render_headline(style, facts), meta

        day = EPOCH_START.timestamp() + rng.randint(0, 60) * DAY
        history: list[HistoryItem] = []
        for h in range(n_history):
            style = new_style if h >= n_history - n_new else old_style
            article, headline, meta = draw(style, int(day))
            history.append(HistoryItem(id=f"{user}-h{h:03d}", input=article, output=headline,
                                       timestamp=int(day), meta=meta))
            day += rng.randint(*GAP_DAYS) * DAY
        for q in range(n_test):
            article, headline, meta = draw(new_style, int(day))
            meta.update(user_topics=list(favoured), drift=drift, old_style=old_style,
                        new_style=new_style)
            samples.append(Sample(id=f"{user}-q{q:03d}", user=user, input=PROMPT + article,
                                  target=headline, history=tuple(history), timestamp=int(day),
                                  meta=meta))
            day += rng.randint(*GAP_DAYS) * DAY
    return samples


# --------------------------------------------------------------------------------------
# Official LaMP-4 files
# --------------------------------------------------------------------------------------

def write_lamp_format(samples: Iterable[Sample], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``dev_questions.json`` and ``dev_outputs.json`` in the official LaMP-4 layout.

    Questions: ``[{id, input, profile: [{id, text, title, date}], user_id}]`` (``text``
    the article, ``title`` the user's headline, ``date`` the ISO date of the timestamp);
    outputs: ``{"task": "LaMP_4", "golds": [{id, output}]}`` for samples with a target.
    Returns (questions path, outputs path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions: list[dict[str, Any]] = []
    golds: list[dict[str, str]] = []
    for s in samples:
        profile = []
        for h in s.history:
            item: dict[str, Any] = {"id": h.id, "text": h.input, "title": h.output}
            if h.timestamp is not None:
                item["date"] = timestamp_to_date(h.timestamp)
            profile.append(item)
        question = {"id": s.id, "input": s.input, "profile": profile, "user_id": s.user}
        if s.timestamp is not None:  # optional in LaMP; read back by the loader (time splits)
            question["date"] = timestamp_to_date(s.timestamp)
        questions.append(question)
        if s.target is not None:
            golds.append({"id": s.id, "output": s.target})
    q_path = out / "dev_questions.json"
    o_path = out / "dev_outputs.json"
    q_path.write_text(json.dumps(questions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    o_path.write_text(json.dumps({"task": "LaMP_4", "golds": golds}, indent=1, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    return q_path, o_path


def _main(argv: list[str] | None = None) -> None:
    """``python -m fints_repro.data.demo OUT_DIR [--seed S] [--drift] ...``: write the files."""
    import argparse

    p = argparse.ArgumentParser(description="Write the SYNTHETIC demo_news data in LaMP-4 format.")
    p.add_argument("out_dir")
    p.add_argument("--n-users", type=int, default=DEFAULT_N_USERS)
    p.add_argument("--n-history", type=int, default=DEFAULT_N_HISTORY)
    p.add_argument("--n-test", type=int, default=DEFAULT_N_TEST)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drift", action="store_true")
    a = p.parse_args(argv)
    samples = generate_demo_news(n_users=a.n_users, n_history=a.n_history, n_test=a.n_test,
                                 seed=a.seed, drift=a.drift)
    q, o = write_lamp_format(samples, a.out_dir)
    print(f"wrote {len(samples)} SYNTHETIC samples to {q} and {o}")


if __name__ == "__main__":
    _main()
