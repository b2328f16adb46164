"""How people name versions: NAME/VERSION, NAME@ALIAS, and the deprecated NAME@VERSION."""

from __future__ import annotations

from typing import Any

import pytest

from loopline.model_ref import ModelRef, ModelRefError, parse_ref, resolve, version_id
from loopline.registry import RegistryState


@pytest.mark.parametrize(("text", "ref"), [
    ("fraud", ModelRef("fraud")),
    ("fraud/2", ModelRef("fraud", version=2)),
    (" fraud/12 ", ModelRef("fraud", version=12)),
    ("fraud@champion", ModelRef("fraud", alias="champion")),
    ("fraud-lr@challenger", ModelRef("fraud-lr", alias="challenger")),
    ("fraud@shadow", ModelRef("fraud", alias="shadow")),
    ("fraud@canary", ModelRef("fraud", alias="canary")),
])
def test_the_current_forms_parse_without_a_note(text: str, ref: ModelRef) -> None:
    assert parse_ref(text) == ref
    assert parse_ref(text).note is None
    assert str(parse_ref(text)) == text.strip()


def test_the_old_at_version_form_still_works_with_a_deprecation_note() -> None:
    ref = parse_ref("fraud@2")
    assert (ref.name, ref.version, ref.alias) == ("fraud", 2, None)
    assert ref.note is not None and "deprecated" in ref.note and "fraud/2" in ref.note
    assert str(ref) == "fraud/2"


@pytest.mark.parametrize(("text", "says"), [
    ("fraud/x", "positive number"),
    ("fraud/0", "positive number"),
    ("fraud/", "positive number"),
    ("fraud@latest", "'latest' is not an alias"),
    ("Fraud/2", "not a pipeline or model name"),
    ("/2", "not a pipeline or model name"),
    ("fraud@2@3", "not an alias"),
])
def test_bad_references_name_the_rule_and_the_forms(text: str, says: str) -> None:
    with pytest.raises(ModelRefError, match="rule: model_ref") as info:
        parse_ref(text, what="--model")
    assert says in str(info.value) and "--model" in str(info.value)


def test_a_version_given_apart_must_agree() -> None:
    assert parse_ref("fraud", version=3) == ModelRef("fraud", version=3)
    assert parse_ref("fraud/3", version=3) == ModelRef("fraud", version=3)
    assert parse_ref("fraud@3", version=3).note is not None  # the note survives
    for text in ("fraud/2", "fraud@champion"):
        with pytest.raises(ModelRefError, match="two versions"):
            parse_ref(text, version=3)
    with pytest.raises(ModelRefError, match="positive"):
        parse_ref("fraud", version=0)


def test_version_id_is_the_printed_form() -> None:
    assert version_id("sea", 2) == "sea/2"
    assert parse_ref(version_id("sea", 2)) == ModelRef("sea", version=2)


def _state(*versions: tuple[str, int, str]) -> RegistryState:
    state = RegistryState()
    for at, (name, version, stage) in enumerate(versions):
        record: dict[str, Any] = {"name": name, "version": version, "stage": stage, "at": at,
                                  "created_at": at, "traffic": 0.0}
        state.versions[("fraud", name, version)] = record
        state.stage_changes.append({"pipeline": "fraud", "name": name, "version": version,
                                    "to_stage": stage, "at": at})
    return state


def test_aliases_resolve_to_the_version_holding_the_stage_now() -> None:
    state = _state(("fraud", 1, "retired"), ("fraud", 2, "champion"), ("fraud", 3, "challenger"),
                   ("fraud", 4, "shadow"), ("fraud", 5, "shadow"), ("other", 1, "champion"))
    assert resolve(parse_ref("fraud@champion"), state, "fraud")["version"] == 2
    assert resolve(parse_ref("fraud@challenger"), state, "fraud")["version"] == 3
    assert resolve(parse_ref("fraud/1"), state, "fraud")["stage"] == "retired"
    assert resolve(parse_ref("other@champion"), state, "fraud")["name"] == "other"
    with pytest.raises(ModelRefError, match=r"names 2 versions \(fraud/4, fraud/5\).*alias_unique"):
        resolve(parse_ref("fraud@shadow"), state, "fraud")
    with pytest.raises(ModelRefError, match=r"no version of fraud is canary now.*fraud/2 champion"):
        resolve(parse_ref("fraud@canary"), state, "fraud")
    with pytest.raises(ModelRefError, match=r"no version fraud/9 .*version_exists"):
        resolve(parse_ref("fraud/9"), state, "fraud")
    with pytest.raises(ModelRefError, match="which version"):
        resolve(parse_ref("fraud"), state, "fraud")
