from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from api.content import file_content
from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.evaluations import EvaluationEventObject, EvaluationObject
from api.services import evaluations
from jobs.evaluation_spec import CreateEvaluation

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=EvaluationObject)
def create_evaluation(session: SessionDep, project: ProjectDep, body: CreateEvaluation) -> EvaluationObject:
    return EvaluationObject.from_row(evaluations.create(session, project, body))


@router.get("", response_model=ListObject[EvaluationObject])
async def list_evaluations(
    read: ProjectReadDep,
    after: str | None = None,
    limit: Limit = 20,
    parent_id: Annotated[str | None, Query(description="Only the evaluation a fine-tuning job asked for.")] = None,
) -> ListObject[EvaluationObject]:
    def run(session, project):
        rows, has_more = evaluations.list_evaluations(session, project, after, limit, parent_id)
        return ListObject.of([EvaluationObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{evaluation_id}", response_model=EvaluationObject)
async def get_evaluation(read: ProjectReadDep, evaluation_id: str) -> EvaluationObject:
    return await read(
        lambda session, project: EvaluationObject.from_row(evaluations.get(session, project, evaluation_id))
    )


@router.post("/{evaluation_id}/cancel", response_model=EvaluationObject)
def cancel_evaluation(session: SessionDep, project: ProjectDep, evaluation_id: str) -> EvaluationObject:
    return EvaluationObject.from_row(evaluations.cancel(session, project, evaluation_id))


@router.get("/{evaluation_id}/events", response_model=ListObject[EvaluationEventObject])
async def list_events(
    read: ProjectReadDep, evaluation_id: str, after: str | None = None, limit: Limit = 20
) -> ListObject[EvaluationEventObject]:
    def run(session, project):
        rows, has_more = evaluations.list_events(session, project, evaluation_id, after, limit)
        return ListObject.of([EvaluationEventObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{evaluation_id}/report", response_class=FileResponse)
def get_report(request: Request, session: SessionDep, project: ProjectDep, evaluation_id: str) -> Response:
    """The full report (JSON), also downloadable as result_files[0]."""
    report = evaluations.report_file(session, project, evaluation_id)
    return file_content(request, report, media_type="application/json", attachment=False)
