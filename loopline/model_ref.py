"""How a person names a model version: ``fraud/2`` (a version), ``fraud@champion`` (an alias).

The one parser every command uses (``models``, ``lineage query``, ``replay``, ``tail``,
``report``). ``NAME/VERSION`` names version VERSION; ``NAME@ALIAS`` names the version that holds
a serving stage now (``champion``, ``challenger``, ``shadow``, ``canary``), as MLflow users read
``name@alias``; ``NAME`` alone names the model (every version). The old ``NAME@VERSION`` still
works and carries a deprecation :attr:`ModelRef.note`. Names cannot contain ``/`` or ``@``
(:mod:`loopline.topics`), so the forms never collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loopline.errors import ModelRefError
from loopline.topics import valid_name

if TYPE_CHECKING:
    from loopline.registry import RegistryState

#: The aliases: a serving stage names whichever version holds it now.
ALIASES = ("champion", "challenger", "shadow", "canary")
_FORMS = "NAME/VERSION (fraud/2), NAME@ALIAS (fraud@champion; aliases: " + ", ".join(ALIASES) + ")"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a name, and a version number or an alias (or neither)."""

    name: str
    version: int | None = None
    alias: str | None = None
    #: A note to show the person (the deprecated ``NAME@VERSION`` form), else None.
    note: str | None = None

    def __str__(self) -> str:
        """The reference in its current spelling."""
        if self.version is not None:
            return version_id(self.name, self.version)
        return f"{self.name}@{self.alias}" if self.alias else self.name


def version_id(name: str, version: int) -> str:
    """How Loopline writes a version everywhere it prints one: ``NAME/VERSION``."""
    return f"{name}/{version}"


def parse_ref(text: str, *, what: str = "model", version: int | None = None) -> ModelRef:
    """Parse ``NAME``, ``NAME/VERSION``, ``NAME@ALIAS`` (or the old ``NAME@VERSION``).

    ``version`` is a version given separately (``--version 2``, or a second argument); it may
    not contradict one in ``text``. Errors name ``what`` (an option, e.g. ``--model``).
    """
    raw = text.strip()
    name, sep, rest = raw, "", ""
    for mark in ("/", "@"):
        if mark in raw:
            name, sep, rest = raw.partition(mark)
            break
    if not valid_name(name):
        raise ModelRefError(f"{what} {text!r}: {name!r} is not a pipeline or model name; "
                            f"write NAME, {_FORMS} (rule: model_ref)")
    ref = ModelRef(name)
    if sep == "/":
        if not rest.isdigit() or int(rest) < 1:
            raise ModelRefError(f"{what} {text!r}: the version after '/' must be a positive "
                                f"number; write {_FORMS} (rule: model_ref)")
        ref = ModelRef(name, version=int(rest))
    elif sep == "@":
        if rest.isdigit() and int(rest) >= 1:
            ref = ModelRef(name, version=int(rest), note=(
                f"note: {raw} names version {rest} the old way (deprecated: '@' names an alias "
                f"such as {name}@champion); write {version_id(name, int(rest))}"))
        elif rest in ALIASES:
            ref = ModelRef(name, alias=rest)
        else:
            raise ModelRefError(f"{what} {text!r}: {rest!r} is not an alias; one of "
                                f"{', '.join(ALIASES)}, or write {name}/VERSION (rule: model_ref)")
    if version is not None:
        if version < 1:
            raise ModelRefError(f"{what} {text!r}: version {version} must be a positive number "
                                "(rule: model_ref)")
        if ref.alias is not None or (ref.version is not None and ref.version != version):
            raise ModelRefError(f"{what} {text!r} and version {version} name two versions; give "
                                "one (rule: model_ref)")
        ref = ModelRef(name, version=version, note=ref.note)
    return ref


def resolve(ref: ModelRef, state: RegistryState, pipeline: str) -> dict[str, Any]:
    """The registry record ``ref`` names in ``pipeline`` (an alias: the version holding it now)."""
    mine = sorted((v for (p, n, _), v in state.versions.items() if p == pipeline and n == ref.name),
                  key=lambda v: v["version"])
    stages = ", ".join(f"{version_id(ref.name, v['version'])} {v['stage']}" for v in mine)
    if ref.version is not None:
        found = next((v for v in mine if v["version"] == ref.version), None)
        if found is None:
            known = f"versions: {stages}" if mine else f"no versions of {ref.name}"
            raise ModelRefError(f"pipeline {pipeline}: no version {ref} ({known}) "
                                "(rule: version_exists)")
        return found
    if ref.alias is None:
        raise ModelRefError(f"{ref.name}: which version? write {ref.name}/VERSION or "
                            f"{ref.name}@ALIAS ({', '.join(ALIASES)}) (rule: model_ref)")
    holders = [v for v in mine if v["stage"] == ref.alias]
    if ref.alias == "champion" and len(holders) > 1:
        from loopline.models import champion  # the registry's own tie-break: last promoted wins

        best = champion(state, pipeline)
        holders = [best] if best is not None and best["name"] == ref.name else holders
    if not holders:
        raise ModelRefError(f"pipeline {pipeline}: no version of {ref.name} is {ref.alias} now "
                            f"({'versions: ' + stages if mine else 'no versions yet'}) "
                            "(rule: alias_held)")
    if len(holders) > 1:
        named = ", ".join(version_id(ref.name, v["version"]) for v in holders)
        raise ModelRefError(f"pipeline {pipeline}: {ref} names {len(holders)} versions ({named}); "
                            "name one by its version (rule: alias_unique)")
    return holders[0]
