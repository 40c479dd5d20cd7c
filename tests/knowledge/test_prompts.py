"""KAR / R4ec prompts: content (titles, ratings, profile, factors), length, versions."""

from __future__ import annotations

import pytest

from cocorec.data import Domain
from cocorec.knowledge import prompts as P

HISTORY = [("Heat", 1995, 5), ("Babe", 1995, 2), ("Casablanca", 1942, 4)]
PROFILE = {"gender": "female", "age": "25-34", "occupation": "writer", "zip": "unknown"}


def test_user_prompt_has_profile_titles_ratings_and_factors():
    p = P.user_prompt(PROFILE, HISTORY)
    assert "female, age 25-34, writer" in p and "unknown" not in p
    assert "Heat (1995): 5" in p and "Babe (1995): 2" in p and "Casablanca (1942): 4" in p
    assert p.index("Heat") < p.index("Babe") < p.index("Casablanca")  # oldest first
    for word in ("genres", "directors or actors", "era and country", "plots and themes", "mood", "acclaim",
                 "dislike"):
        assert word in p
    assert "1 (bad) to 5 (great)" in p


def test_user_prompt_without_years_and_label_only_data():
    p = P.user_prompt({}, [("Heat", None, 5), ("Babe", None, 2)], has_ratings=False, noun="item")
    assert p.startswith("A user rated these items")
    assert "Heat: liked" in p and "Babe: disliked" in p
    assert "item taste" in p


def test_item_prompt_has_title_year_genres_and_the_same_factors():
    p = P.item_prompt({"title": "Heat", "year": 1995, "tags": ["Action", "Crime"], "extra": {"plot": "a heist"}})
    assert '"Heat" (1995; Action, Crime)' in p
    for word in ("genre", "director and main actors", "era and country", "plot and theme", "mood", "acclaim"):
        assert word in p
    assert "plot: a heist." in p
    assert '"Nameless"' in P.item_prompt({"title": "Nameless", "year": None, "tags": []})
    assert "(" not in P.item_prompt({"title": "Nameless", "year": None, "tags": []})


def test_reflect_and_refine_prompts_carry_history_reasoning_and_critique():
    hist = P.user_history_part(PROFILE, HISTORY)
    r = P.reflect_prompt(hist, "  The user loves family films like Babe. ")
    assert hist in r and '"The user loves family films like Babe."' in r and "contradict" in r
    f = P.refine_prompt(hist, "Loves family films.", "Babe was rated 2.")
    assert hist in f and "Loves family films." in f and "Babe was rated 2." in f and "corrected" in f


def test_encoder_text_puts_the_generation_before_the_history():
    hist = P.user_history_part(PROFILE, HISTORY)
    t = P.user_encoder_text(" Likes crime dramas. ", hist)
    assert t.startswith("Likes crime dramas.\n") and t.endswith(hist)


def test_prompt_with_30_long_titles_stays_short():
    # ~30 history items of long MovieLens titles: the prompt must fit a small LM's context easily.
    hist = [(f"Some Rather Long Movie Title Number {k}, The (Original Title)", None, 1 + k % 5) for k in range(30)]
    p = P.user_prompt(PROFILE, hist)
    assert len(p) < 2600
    assert len(p.split()) < 450


def test_versions_cover_every_template():
    assert set(P.TEMPLATE_VERSIONS) == {"user", "item", "reflect", "refine"}
    assert len(set(P.TEMPLATE_VERSIONS.values())) == 4


@pytest.mark.parametrize("profile,expected", [({"gender": "M", "age": "20"}, "M, age 20"),
                                              ({"gender": "unknown"}, ""), ({"city": "Paris"}, "city Paris")])
def test_profile_phrase(profile, expected):
    assert P.profile_phrase(profile) == expected


# ----------------------------------------------------------------------------- the domain's wording
APPS = Domain(item_noun="app", item_noun_plural="apps", feedback="implicit",
              feedback_meaning="number of times the user opened the app", factors=("category", "purpose", "price"),
              profile_fields={"country": "from {value}"}, tag_label="Category")
APP_HISTORY = [("Maps", None, 5), ("Mail", None, 5), ("Chess", None, 5)]


def test_implicit_prompts_show_counts_with_their_meaning_never_ratings():
    p = P.user_prompt({"country": "FR"}, APP_HISTORY, has_ratings=True, domain=APPS, counts=[3, 40, 1.5])
    assert p.startswith("A user (from FR) interacted with these apps, oldest first, with the number of times the "
                        "user opened the app in parentheses:\nMaps (3); Mail (40); Chess (1.5)\n")
    assert "Describe this user's app taste in 3 sentences: which category, purpose, and price they like" in p
    for rating_word in ("rated", "rating", "(bad)", "(great)", ": 5", "5/5", "liked", "movie", "director", "genre"):
        assert rating_word not in p
    bare = P.user_prompt({}, APP_HISTORY, domain=APPS)            # implicit without a count column
    assert "A user interacted with these apps, oldest first:\nMaps; Mail; Chess\n" in bare and "(" not in bare
    assert "5" not in bare


def test_implicit_reflect_and_refine_check_against_the_history():
    part = P.user_history_part({}, APP_HISTORY, domain=APPS, counts=[3, 40, 1])
    r = P.reflect_prompt(part, "Loves games.", domain=APPS)
    assert "against the history" in r and "the history contradicts and the apps that show it" in r
    assert "rating" not in r
    f = P.refine_prompt(part, "Loves games.", "Opened Maps 3 times.", domain=APPS)
    assert "this user's app taste in 3 sentences: which category, purpose, and price they like" in f
    assert "rating" not in f and part in f


def test_explicit_generic_domain_uses_its_noun_factors_and_profile_wording():
    shop = Domain(item_noun="product", item_noun_plural="products", factors=("brand", "price/value"),
                  profile_fields={"country": "from {value}"})
    p = P.user_prompt({"country": "FR", "age": "30"}, HISTORY, domain=shop)
    assert p.startswith("A user (from FR, age 30) rated these products from 1 (bad) to 5 (great), oldest first:\n"
                        "Heat (1995): 5; Babe (1995): 2")
    assert p.endswith("Describe this user's product taste in 3 sentences: which brand and price and value they "
                      "like, and what they dislike.")
    i = P.item_prompt({"title": "Kettle", "year": None, "tags": ["kitchen"]}, domain=shop)
    assert i == 'Describe the product "Kettle" (kitchen) in 3 sentences: its brand and price and value.'
    assert "movie" not in p + i and "director" not in p + i
    assert P.system_message(shop) == "You are a product expert. Answer briefly and concretely."
    assert P.system_message(APPS) == "You are an app expert. Answer briefly and concretely."
    assert P.reflect_prompt("h", "r", domain=shop).count("the ratings") == 2


@pytest.mark.parametrize("factors,phrase", [(("a",), "a"), (("a", "b"), "a and b"), (("a", "b", "c/d"),
                                                                                    "a, b, and c and d")])
def test_factor_phrases_of_a_declared_list(factors, phrase):
    assert P.factor_phrases(Domain(factors=factors)) == (phrase, phrase)
