"""The kinds of job. A job's kind picks its resource path, its rules (jobs/<kind>.py) and its worker stage."""

from __future__ import annotations

from enum import StrEnum


class JobKind(StrEnum):
    fine_tune = "fine_tune"
    export = "export"
    evaluation = "evaluation"
    sweep = "sweep"

    @property
    def label(self) -> str:
        """How messages name a job of this kind."""
        return _LABELS[self]

    @property
    def id_prefix(self) -> str:
        """The prefix of this kind's job ids (ftjob-..., exjob-...)."""
        return _ID_PREFIXES[self]

    @property
    def id_param(self) -> str:
        """The request field a 404 or 409 about a job of this kind points at."""
        return _ID_PARAMS[self]


_LABELS = {
    JobKind.fine_tune: "fine-tuning job",
    JobKind.export: "export job",
    JobKind.evaluation: "evaluation job",
    JobKind.sweep: "sweep",
}
_ID_PREFIXES = {
    JobKind.fine_tune: "ftjob",
    JobKind.export: "exjob",
    JobKind.evaluation: "evaljob",
    JobKind.sweep: "sweep",
}
_ID_PARAMS = {
    JobKind.fine_tune: "fine_tuning_job_id",
    JobKind.export: "export_id",
    JobKind.evaluation: "evaluation_id",
    JobKind.sweep: "sweep_id",
}
