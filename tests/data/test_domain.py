"""Domain fields: parsed from the spec, checked, and exposed on the prepared data; MovieLens keeps
today's prompt wording."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cocorec.data import MOVIELENS, CTRData, DataError, Domain, prepare
from cocorec.knowledge import prompts
from tests.conftest import write_generic
from tests.data.helpers import edit_spec, write_implicit


def test_movielens_domain_is_todays_prompt_wording(ml100k):
    assert ml100k.domain == MOVIELENS and ml100k.domain.item_noun == "movie" and not ml100k.implicit
    assert ml100k.domain.factors == prompts.FACTORS
    for u in range(100):
        assert ml100k.domain.profile_phrase(ml100k.user_profile[u]) == prompts.profile_phrase(ml100k.user_profile[u])
    assert ml100k.feedback == {"type": "explicit", "rating_scale": [1.0, 5.0], "positive_threshold": 4.0}


def test_movielens_data_processed_before_the_domain_was_recorded(ml100k):
    meta = {k: v for k, v in ml100k.meta.items() if k not in ("domain", "feedback")}
    old = CTRData(ml100k.name, ml100k.spec, ml100k.config, ml100k.arrays, meta)
    assert old.domain == MOVIELENS and not old.implicit


def test_movielens_samples_are_unchanged(ml100k):
    # Protocol v2's ml-100k samples and LM histories, byte for byte: a change here must bump PROTOCOL_VERSION.
    h = hashlib.sha256()
    for k in sorted(ml100k.arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(ml100k.arrays[k]).tobytes())
    assert h.hexdigest() == "ed577ecea303b1b7d6cbc55b4a5fa700a530f080a4062756bbf507601ca31875"


def test_generic_defaults(tmp_path, cache_dir):
    data = prepare(str(write_generic(tmp_path / "d")))
    dom = data.domain
    assert (dom.item_noun, dom.item_noun_plural, dom.feedback) == ("item", "items", "explicit")
    assert dom.feedback_meaning == "rating from 1 to 5" and dom.factors == Domain().factors
    assert "movie" not in " ".join(dom.factors) and "director" not in " ".join(dom.factors)
    assert dom.profile_phrase({"gender": "F", "age": "30"}) == "F, age 30"


def test_generic_named_ml_gets_movielens_wording(tmp_path, cache_dir):
    d = edit_spec(write_generic(tmp_path / "d"), lambda s: s.update(name="ml-latest-small"))
    data = prepare(str(d))
    assert data.domain == MOVIELENS
    assert "Movies the user watched" in data.user_text[0]


def test_spec_domain(tmp_path, cache_dir):
    d = write_implicit(tmp_path / "d")
    data = prepare(str(d))
    dom = data.domain
    assert (dom.item_noun, dom.item_noun_plural) == ("app", "apps")
    assert dom.factors == ("category", "purpose", "price") and dom.implicit
    assert dom.profile_phrase(data.user_profile[0]) in ("from FR", "from DE")
    assert Domain.from_dict(dom.to_dict()) == dom and hash(Domain.from_dict(dom.to_dict())) == hash(dom)
    again = prepare(str(d))                       # from the processed-data cache: the same domain
    assert again.domain == dom and again.feedback == data.feedback
    edit_spec(d, lambda s: s["domain"].update(item_noun="bus", item_noun_plural="buses"))
    assert prepare(str(d)).domain.item_noun_plural == "buses"


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["domain"].update(profile_fields={"city": "in {value}"}),
     r"'domain\.profile_fields' words 'city', which is not a 'users\.profile' column \(profile: country\)"),
    (lambda s: s["domain"].update(profile_fields={"country": "country"}),
     r"'domain\.profile_fields\.country' must be a wording with \{value\}"),
    (lambda s: s["domain"].update(profile_fields={"country": "{value} {x}"}),
     r"'domain\.profile_fields\.country' must be a wording with \{value\}"),
    (lambda s: s["domain"].update(factors=[]), r"'domain\.factors' must be a non-empty list of non-empty strings"),
    (lambda s: s["domain"].update(item_noun=3), r"'domain\.item_noun' must be a non-empty string, got 3"),
])
def test_domain_errors(tmp_path, cache_dir, edit, message):
    d = edit_spec(write_implicit(tmp_path / "d"), edit)
    with pytest.raises(DataError, match=r"dataset\.yaml: " + message):
        prepare(str(d))


def test_movielens_domain_recorded_before_tag_label_reads_genres(ml100k):
    old = {k: v for k, v in MOVIELENS.to_dict().items() if k != "tag_label"}
    assert Domain.from_dict(old) == MOVIELENS and Domain.from_dict(old).tag_label == "Genres"
    meta = {**ml100k.meta, "domain": old}
    assert CTRData(ml100k.name, ml100k.spec, ml100k.config, ml100k.arrays, meta).domain == MOVIELENS
    other = {**old, "item_noun": "film"}                  # not MovieLens' domain: the generic label
    assert Domain.from_dict(other).tag_label == "Tags"
    assert "Genres: " in ml100k.item_text[1] and "Movies the user watched" in ml100k.user_text[0]


def test_generic_explicit_texts_use_the_domain_noun_and_tag_label(tmp_path, cache_dir):
    d = write_generic(tmp_path / "d")                     # tags column 'genres', no domain section
    data = prepare(str(d))
    assert data.domain.tag_label == "Genres"
    assert "Items the user rated, oldest first, with their rating (1-5): " in data.user_text[0]
    assert "Movies" not in " ".join(data.user_text) and "watched" not in " ".join(data.user_text)
    edit_spec(d, lambda s: (s["items"].update(tags="genres"), s.update(domain={"item_noun": "book"})))
    data = prepare(str(d))
    assert data.user_text[0].splitlines()[1].startswith("Books the user rated, oldest first")
    edit_spec(d, lambda s: s["domain"].update(tag_label="Shelves"))
    data = prepare(str(d))
    assert data.domain.tag_label == "Shelves" and all(" Shelves: " in t for t in data.item_text[1:])
    assert "Genres" not in " ".join(data.item_text)


def test_implicit_item_texts_name_the_tag_column(tmp_path, cache_dir):
    data = prepare(str(write_implicit(tmp_path / "d")))   # tags column 'cat'
    assert data.domain.tag_label == "Cat" and all(" Cat: " in t for t in data.item_text[1:])
    assert data.user_text[0].splitlines()[1].startswith("Apps the user interacted with, oldest first, with the "
                                                        "number of times the user opened the app: ")
