"""Query strings as OpenAI's API reads them: `metadata[key]=value` filters, and no parameter silently ignored."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import QueryParams

from models.errors import InvalidRequest

_METADATA_PARAM = re.compile(r"^metadata\[(?P<key>[^\[\]]{1,64})\]$")
MAX_METADATA_FILTERS = 16  # a job holds at most 16 metadata pairs: more could match nothing
MAX_METADATA_VALUE_CHARS = 512
# The filter in the OpenAPI document, as OpenAI's own declares it: `metadata[key]=value`, any number of keys.
METADATA_FILTER_PARAMETER = {
    "parameters": [
        {
            "name": "metadata",
            "in": "query",
            "required": False,
            "style": "deepObject",
            "explode": True,
            "schema": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE_CHARS},
            },
            "description": "Only jobs whose metadata holds every given pair (`metadata[team]=a`).",
        }
    ]
}


def _declared(route: APIRoute) -> tuple[frozenset[str], bool]:
    """The query parameters a route reads (its own and its dependencies'), and whether it takes metadata[KEY]."""
    return frozenset(_query_names(route.dependant)), route.openapi_extra == METADATA_FILTER_PARAMETER


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_names(dependency)
    return names


def refuse_unknown_query(request: Request) -> None:
    """Every route: a query parameter the route does not read is a 400 naming it. An OpenAI client that sends a
    filter Grove does not apply (a newer SDK's, a typo) must not get an unfiltered answer back."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    names, takes_metadata = _declared(route)
    for name in request.query_params:
        if name in names or (takes_metadata and name.startswith("metadata")):
            continue
        known = ", ".join(sorted(names | ({"metadata[KEY]"} if takes_metadata else set()))) or "none"
        raise InvalidRequest(
            f"Unknown query parameter {name!r}; this route takes: {known}.", param=name, code="unknown_parameter"
        )


def metadata_filter(params: QueryParams) -> dict[str, str]:
    """The `metadata[key]=value` pairs of a list request, checked."""
    wanted: dict[str, str] = {}
    for name, value in params.multi_items():
        if not name.startswith("metadata"):
            continue
        match = _METADATA_PARAM.match(name)
        if match is None:
            raise InvalidRequest(f"{name!r} is not a metadata filter: use metadata[KEY]=VALUE.", param=name)
        key = match["key"]
        if key in wanted and wanted[key] != value:
            raise InvalidRequest(f"{name} is given twice with different values.", param=name)
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(f"{name} is longer than {MAX_METADATA_VALUE_CHARS} characters.", param=name)
        wanted[key] = value
    if len(wanted) > MAX_METADATA_FILTERS:
        raise InvalidRequest(f"At most {MAX_METADATA_FILTERS} metadata filters.", param="metadata")
    return wanted
