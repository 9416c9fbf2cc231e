"""The usage report: a month's estimated spend, by processor and by conversation."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from service.domain import usage
from service.http import examples as ex
from service.http.deps import tenant_of
from service.http.problems import problem_responses
from service.resources import Resources
from service.schemas import Usage

Month = Annotated[
    str | None,
    QueryParameter(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$",
                   description="A calendar month (UTC), YYYY-MM; the current one by default"),
]


class UsageController(Controller):
    path = "/v1/usage"
    tags = ("usage",)

    @get(operation_id="GetUsage",
         summary="A month's estimated spend, by processor and conversation",
         responses={**problem_responses(), **ex.answer(
             200, Usage, "Estimated spend of the month (UTC)",
             ex.example("month", "February 2026", ex.USAGE))})
    async def get(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        month: Month = None,
    ) -> Usage:
        """The tenant's estimated spend in a calendar month (UTC), by processor and by conversation,
        and its budget."""
        return await usage.get_usage(resources.pool, tenant_of(request), month)
